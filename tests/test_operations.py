"""Operations: metrics, health, access log, Redis outages, hot reload, status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway.config import AccessLogSettings, ConfigError, load_settings
from gateway.config.values import CAMPAIGN_ID
from gateway.core.accesslog import AccessLog
from gateway.embedded.server import EmbeddedRedis
from gateway.process.serve import EARLY_RELOAD, _reload_on_sighup
from tests.helpers import (
    AUTH,
    Gateway,
    OpenGateway,
    Shop,
    check_invariant,
    open_gateway,
    problem_of,
    settings_for,
    wait_for,
)
from tests.processes import GatewayProcess

SAMPLE = re.compile(r"^(flashgate_\w+)(\{[^}]*\})? (\S+)$")


def samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    found = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            found[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return found


async def scrape(gateway: Gateway) -> dict[str, float]:
    response = await gateway.admin.get("/metrics")  # no token needed by default
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(await response.text())


# ------------------------------------------------------------------------- metrics


@pytest.mark.integration
async def test_metrics_count_requests_and_read_stock_from_redis(gateway: Gateway) -> None:
    before = await scrape(gateway)
    for i in range(4):
        assert (await gateway.buy(f"user-{i}")).status == 201
    assert (await gateway.buy("user-0")).status == 403
    assert (await gateway.buy(None)).status == 401
    after = await scrape(gateway)

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew('flashgate_requests_total{campaign="phone-1111",code="ok"}') == 4
    assert grew('flashgate_requests_total{campaign="phone-1111",code="limit-exceeded"}') == 1
    assert grew('flashgate_requests_total{campaign="phone-1111",code="unauthenticated"}') == 1
    assert grew('flashgate_upstream_responses_total{class="2xx",upstream="shop"}') == 4
    assert grew('flashgate_decision_seconds_count{campaign="phone-1111"}') == 5
    units = 'flashgate_stock_units{campaign="phone-1111",state="%s"}'
    assert (after[units % "available"], after[units % "sold"], after[units % "stock_total"]) == (
        6,
        4,
        10,
    )
    assert after['flashgate_reservations{campaign="phone-1111",state="committed"}'] == 4
    assert after['flashgate_sold_out{campaign="phone-1111"}'] == 0
    assert after['flashgate_books_balanced{campaign="phone-1111"}'] == 1
    assert after["flashgate_redis_circuit_open"] == 0


@pytest.mark.integration
async def test_no_label_carries_a_user_or_a_reservation(gateway: Gateway) -> None:
    rids = []
    for i in range(10):
        response = await gateway.buy(f"secret-user-{i}", key=f"secret-key-{i}")
        rids.append(response.headers["X-Reservation-Id"])
    for i in range(30):
        await gateway.buy(f"secret-user-{100 + i}")
    text = await (await gateway.admin.get("/metrics")).text()
    assert "secret-user" not in text
    assert "secret-key" not in text
    assert not any(rid in text or rid.split(".")[1] in text for rid in rids)
    assert "127.0.0.1" not in text
    campaigns = set(re.findall(r'campaign="([^"]*)"', text))
    # the registry is the process's: campaigns (and carts) of earlier tests may be there
    assert "phone-1111" in campaigns
    assert all(CAMPAIGN_ID.fullmatch(c) for c in campaigns), campaigns


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_promtool_accepts_the_metrics(gateway: Gateway, tmp_path: Path) -> None:
    for i in range(12):
        await gateway.buy(f"user-{i}")
    text = await (await gateway.admin.get("/metrics")).text()
    checker = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await checker.communicate(text.encode())
    assert checker.returncode == 0, output.decode()


@pytest.mark.e2e
@pytest.mark.slow
async def test_metrics_add_up_every_worker(
    process_config: dict[str, Any], run_gateway: Callable[..., GatewayProcess], redis: Redis
) -> None:
    process_config["campaigns"][0]["stock"] = 1000
    gateway = run_gateway(process_config, "--workers", "2")
    ok = 'flashgate_requests_total{campaign="phone-1111",code="ok"}'

    async def total() -> float:
        async with (
            aiohttp.ClientSession() as fresh,  # a new connection: either worker answers
            fresh.get(f"{gateway.admin_url}/metrics") as response,
        ):
            return samples(await response.text()).get(ok, 0.0)

    async with aiohttp.ClientSession() as session:
        for i in range(60):
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.post(  # new connections
                    f"{gateway.url}/seckill/phone-1111", headers={"X-User-Id": f"u{i}"}
                ) as response,
            ):
                assert response.status == 201

        async def everyones_published() -> bool:  # each worker publishes its own every second
            return await total() == 60.0

        await wait_for(everyones_published, within=10)
        totals = set()
        for _ in range(10):  # whichever worker answers, the totals are everyone's
            totals.add(await total())
        async with session.get(f"{gateway.admin_url}/campaigns", headers=AUTH):
            pass
    gateway.stop()
    assert totals == {60.0}


# -------------------------------------------------------------------------- health


@pytest.mark.integration
async def test_readiness_follows_redis(gateway: Gateway, redis_server: EmbeddedRedis) -> None:
    for client in (gateway.edge, gateway.admin):
        ready = await client.get("/readyz")
        assert (ready.status, (await ready.json())["redis"]) == (200, "ok")
    redis_server.stop()
    try:

        async def unready() -> bool:
            return (await gateway.edge.get("/readyz")).status == 503

        await wait_for(unready, within=10)
        document = await (await gateway.admin.get("/readyz")).json()
        assert document["redis"] == "unreachable"
        assert (await gateway.edge.get("/healthz")).status == 200  # alive all the same
    finally:
        redis_server.start()

    async def redis_back_without_the_campaign() -> bool:
        ready = await gateway.edge.get("/readyz")
        document = await ready.json()
        # this Redis keeps no data across a restart: the campaign is gone, and the
        # gateway stays unready rather than putting the file's stock on sale again
        return (ready.status, document["redis"], document["campaigns_missing"]) == (
            503,
            "ok",
            ["phone-1111"],
        )

    await wait_for(redis_back_without_the_campaign, within=15)


@pytest.mark.integration
async def test_a_respawned_worker_never_recreates_vanished_counters(
    settings_data: dict[str, Any],
    redis_server: EmbeddedRedis,
    redis: Redis,
) -> None:
    """Redis lost its data and a worker died: the supervisor's replacement must not put
    the file's full stock on sale again; it waits for the counters (503 meanwhile)."""
    async with open_gateway(settings_for(settings_data), redis_server.url, respawned=True) as gw:
        ready = await gw.admin.get("/readyz")
        assert (ready.status, (await ready.json())["campaigns_waiting"]) == (503, ["phone-1111"])
        assert (await problem_of(await gw.buy("alice")))["code"] == "unavailable"
        assert await redis.exists("fg:{phone-1111}:state") == 0
        # the operator restores the campaign (here: as its first gateways had created it)
        await gw.runtime.snapshot.campaigns["phone-1111"].store.init(7, "operator")

        async def ready_again() -> bool:
            return (await gw.admin.get("/readyz")).status == 200

        await wait_for(ready_again, within=10)
        assert (await gw.buy("alice")).status == 201
        assert (await gw.campaign())["stock_total"] == 7
    await check_invariant(redis, "phone-1111", per_user_limit=1)


def test_a_dead_workers_gauges_leave_with_it(tmp_path: Path) -> None:
    """A worker that died with its circuit open must not keep the circuit-open alert
    firing: the supervisor drops a dead worker's gauges (mark_process_dead)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    worker = (
        "from gateway.stats import CIRCUIT_OPEN, LOOP_STALL_SECONDS\n"
        "CIRCUIT_OPEN.set(1)\nLOOP_STALL_SECONDS.set(2.5)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dead = subprocess.run([sys.executable, "-c", worker], env=env, check=True)
    assert dead.returncode == 0

    def gauges() -> dict[str, float]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(tmp_path))  # type: ignore[no-untyped-call]
        wanted = ("flashgate_redis_circuit_open", "flashgate_event_loop_stall_seconds")
        return {
            sample.name: sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name in wanted
        }

    assert gauges() == {
        "flashgate_redis_circuit_open": 1.0,
        "flashgate_event_loop_stall_seconds": 2.5,
    }
    pid = int(next(tmp_path.glob("gauge_*")).stem.rsplit("_", 1)[1])
    mark_process_dead(pid, str(tmp_path))  # type: ignore[no-untyped-call]
    assert gauges() == {}


# ----------------------------------------------------------------------- access log


@pytest.fixture
def access_log_file(settings_data: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "access.log"
    settings_data["access_log"] = {"path": str(path)}
    return path


@pytest.mark.integration
async def test_access_log_is_json_lines(access_log_file: Path, gateway: Gateway) -> None:
    won = await gateway.buy("alice")
    await gateway.buy("alice")
    for i in range(9):
        await gateway.buy(f"user-{i}")
    await gateway.buy("late")  # sold out: by Redis (logged) or by the local flag (not logged)
    await gateway.runtime.watch.poll(gateway.runtime.campaign_keys())
    await gateway.buy("later")  # sold out: answered from memory, not logged by default

    def lines() -> list[dict[str, Any]]:
        if not access_log_file.exists():
            return []
        return [json.loads(line) for line in access_log_file.read_text().splitlines()]

    await wait_for(lambda: len(lines()) >= 11, within=5)  # the background flush wrote them
    gateway.runtime.access.flush()  # and whatever else was recorded: the file is complete
    logged = lines()
    assert len(logged) in (11, 12)
    first = logged[0]
    assert set(first) == {
        "time",
        "campaign",
        "user",
        "client",
        "code",
        "status",
        "latency_ms",
        "reservation_id",
    }
    assert (first["campaign"], first["user"], first["code"], first["status"]) == (
        "phone-1111",
        "alice",
        "ok",
        201,
    )
    assert first["reservation_id"] == won.headers["X-Reservation-Id"]
    assert logged[1]["code"] == "limit-exceeded"
    assert [line["code"] for line in logged[2:11]] == ["ok"] * 9
    assert all(line["code"] == "sold-out" for line in logged[11:])
    assert all(line["user"] != "later" for line in logged)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("trusted", "client"), [(["127.0.0.1/32"], "198.51.100.7"), ([], "127.0.0.1")]
)
async def test_access_log_names_the_client_a_trusted_proxy_forwarded(
    settings_data: dict[str, Any],
    redis: Redis,  # a flushed Redis
    new_gateway: OpenGateway,
    tmp_path: Path,
    trusted: list[str],
    client: str,
) -> None:
    path = tmp_path / "access.log"
    settings_data["access_log"] = {"path": str(path)}
    settings_data["gateway"]["trusted_proxies"] = trusted
    async with new_gateway() as gateway:
        await gateway.buy("alice", headers={"X-Forwarded-For": "198.51.100.7"})
        await wait_for(lambda: path.exists() and path.read_text().strip() != "", within=5)
    assert json.loads(path.read_text().splitlines()[0])["client"] == client


@pytest.mark.parametrize("path", ["/dev/full", "/nonexistent-flashgate-dir/access.log"])
def test_an_unwritable_access_log_drops_lines_and_recovers(path: str, tmp_path: Path) -> None:
    access = AccessLog(AccessLogSettings(path=path))
    for _ in range(3):
        access.record(
            campaign="c",
            user="u",
            code="ok",
            status=201,
            seconds=0.001,
            reservation_id="",
            client="",
        )
    access.flush()  # raises nothing: a full disk must not fail buyers
    assert access.dropped == 3
    # the next flush opens the file afresh: once writable again, lines arrive
    good = tmp_path / "access.log"
    access.settings = AccessLogSettings(path=str(good))
    access.record(
        campaign="c", user="u", code="ok", status=201, seconds=0.001, reservation_id="", client=""
    )
    access.close()
    assert json.loads(good.read_text())["campaign"] == "c"
    assert access.dropped == 3


# -------------------------------------------------------------------- Redis outages


@pytest.fixture
async def durable_redis() -> AsyncIterator[EmbeddedRedis]:
    """A private Redis with an append-only file: its data survives a restart."""
    server = EmbeddedRedis(appendonly=True, extra_args=("--appendfsync", "always"))
    server.start()
    yield server
    server.close()


#: How many buyers the crowd has, each sending one request after another.
CROWD = 16


async def _crowd(url: str, seconds: float, log: list[tuple[int, float, float, int]]) -> None:
    """CROWD buyers for ``seconds``; ``log`` gets (buyer, started, ended, status) per request."""
    counter = iter(range(10**9))
    stop_at = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def buyer(index: int) -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                async with session.post(url, headers={"X-User-Id": f"b{next(counter)}"}) as r:
                    await r.read()
                    log.append((index, started, time.monotonic(), r.status))

        await asyncio.gather(*(buyer(i) for i in range(CROWD)))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("outage", ["stopped", "paused"])
async def test_redis_outage_under_load_fails_closed_and_recovers(
    settings_data: dict[str, Any], durable_redis: EmbeddedRedis, shop: Shop, outage: str
) -> None:
    settings_data["campaigns"][0].update(stock=100_000, per_user_limit=1)
    accepted_at: list[float] = []

    async def backend(request: web.Request) -> web.StreamResponse:
        accepted_at.append(time.monotonic())
        return web.json_response({"ok": True}, status=201)

    shop.respond = backend
    log: list[tuple[int, float, float, int]] = []
    openings_before = _openings()
    async with open_gateway(settings_for(settings_data), durable_redis.url) as gateway:
        url = str(gateway.edge.make_url("/seckill/phone-1111"))
        crowd = asyncio.ensure_future(_crowd(url, 5.0, log))
        # The sleeps here are the scenario, not waits for background work: a second of
        # buying, then an outage of 1.5 s (Redis stopped or paused), then buying again.
        await asyncio.sleep(1.0)
        assert durable_redis.process is not None
        down_at = time.monotonic()
        if outage == "stopped":
            durable_redis.stop()
            await asyncio.sleep(1.5)
            durable_redis.start()
        else:
            durable_redis.process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.5)
            durable_redis.process.send_signal(signal.SIGCONT)
        up_at = time.monotonic()
        await crowd
        breaker_opened = gateway.runtime.guard.breaker.openings
        redis = Redis.from_url(durable_redis.url)

        async def settled() -> bool:  # late replies undone, late commits retried
            state = await redis.hget("fg:{phone-1111}:state", "reserved")
            return state == b"0"

        await wait_for(settled, within=20)
        state = await check_invariant(redis, "phone-1111", per_user_limit=1)
        await redis.aclose()
        # published once a second without a scrape, and still after the breaker opened
        await wait_for(lambda: _openings() - openings_before >= breaker_opened, within=5)
        published = _openings() - openings_before

        async def circuit_closed_published() -> bool:
            return (await scrape(gateway))["flashgate_redis_circuit_open"] == 0

        await wait_for(circuit_closed_published, within=5)
        metrics = await scrape(gateway)

    statuses = [status for _, _, _, status in log]
    assert set(statuses) <= {201, 503}
    during = [status for _, start, end, status in log if start > down_at + 0.3 and end < up_at]
    assert during
    assert set(during) == {503}  # fail closed: nobody admitted
    after = [status for _, start, _, status in log if start > up_at + 1.0]
    assert 201 in after  # it recovered on its own
    # nothing was admitted without Redis: every sale the backend saw is counted, no more
    assert state["sold"] == len(accepted_at) == statuses.count(201)
    assert not any(down_at + 0.3 < t < up_at for t in accepted_at)
    # a hung Redis did not hang the requests: every buyer got answers while Redis was still
    # down (a request left waiting for Redis would have kept its buyer silent until it came back)
    answered_while_down = {buyer for buyer, _, end, _ in log if down_at < end < up_at}
    assert answered_while_down == set(range(CROWD))
    assert breaker_opened >= 1
    # the metrics tell the story, and keep being published after the outage
    assert published == breaker_opened
    assert metrics["flashgate_redis_circuit_open"] == 0
    assert metrics['flashgate_requests_total{campaign="phone-1111",code="unavailable"}'] >= 1


def _openings() -> float:
    return REGISTRY.get_sample_value("flashgate_redis_circuit_openings_total") or 0.0


# --------------------------------------------------------------------------- reload


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """Where a reloadable gateway reads its configuration (tests write changes there)."""
    return tmp_path / "flashgate.yaml"


@pytest.fixture
def reloadable(
    settings_data: dict[str, Any], redis_server: EmbeddedRedis, config_file: Path
) -> OpenGateway:
    """``async with reloadable() as gw``: ``settings_data`` as it is then, written to
    ``config_file``, and a gateway started from that file, which a reload reads again."""

    def start() -> contextlib.AbstractAsyncContextManager[Gateway]:
        _write(config_file, settings_data)
        settings = load_settings(config_file)
        return open_gateway(settings, redis_server.url, config_path=str(config_file))

    return start


@pytest.mark.integration
async def test_reload_applies_changes_and_never_resets_stock(
    settings_data: dict[str, Any],
    redis: Redis,
    shop: Shop,
    reloadable: OpenGateway,
    config_file: Path,
) -> None:
    async with reloadable() as gw:
        for i in range(3):
            assert (await gw.buy(f"user-{i}")).status == 201
        assert (await gw.buy("user-0")).status == 403

        changed = json.loads(json.dumps(settings_data))
        changed["campaigns"][0]["per_user_limit"] = 2
        changed["campaigns"][0]["max_quantity"] = 2
        changed["campaigns"].append(
            {"id": "tv-2222", "route": "POST /seckill/tv-2222", "upstream": "shop", "stock": 2}
        )
        _write(config_file, changed)
        reloaded = await gw.admin.post("/reload", headers=AUTH)
        assert reloaded.status == 200, await reloaded.text()
        assert await reloaded.json() == {
            "status": "reloaded",
            "added": ["tv-2222"],
            "removed": [],
            "kept": ["phone-1111"],
        }
        assert (await gw.buy("user-0")).status == 201  # the new limit applies
        assert (await gw.buy("user-0", path="/seckill/tv-2222")).status == 201  # new campaign
        document = await gw.campaign()
        assert (document["stock_total"], document["sold"]) == (10, 4)  # never reset

        assert await redis.xlen("fg:{tv-2222}:ledger") >= 1
    await check_invariant(redis, "phone-1111", per_user_limit=2)


@pytest.mark.integration
async def test_a_sighup_that_came_while_starting_reloads_once_serving(
    settings_data: dict[str, Any], reloadable: OpenGateway, config_file: Path
) -> None:
    async with reloadable() as gw:
        changed = json.loads(json.dumps(settings_data))
        changed["campaigns"][0]["per_user_limit"] = 3
        _write(config_file, changed)
        EARLY_RELOAD.set()  # what the worker's early handler does
        try:
            _reload_on_sighup(gw.runtime)

            def reloaded() -> bool:
                return gw.runtime.snapshot.campaigns["phone-1111"].settings.per_user_limit == 3

            await wait_for(reloaded, within=5)
            assert not EARLY_RELOAD.is_set()
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


@pytest.mark.integration
async def test_a_reload_during_a_delivery_backoff_delivers_on_the_new_backend(
    settings_data: dict[str, Any],
    redis: Redis,
    shop: Shop,
    reloadable: OpenGateway,
    config_file: Path,
) -> None:
    """The old backend connection closes after a reload; a queued order waiting to be
    retried goes to the new one instead of failing against the closed one."""
    settings_data["campaigns"][0].update(
        forward="queue", max_attempts=2, retry_backoff="2s", max_retry_backoff="2s"
    )
    settings_data["upstreams"]["shop"]["timeout"] = 0.5  # closed 1.5 s after the reload
    answers = iter([503])

    async def busy_once(request: web.Request) -> web.StreamResponse:
        status = next(answers, 201)
        return web.json_response({"status": status}, status=status)

    shop.respond = busy_once
    async with reloadable() as gw:
        response = await gw.buy("alice")
        assert response.status == 202
        rid = (await response.json())["reservation_id"]
        await wait_for(lambda: len(shop.seen) == 1, within=5)  # failed once: backing off
        changed = json.loads(json.dumps(settings_data))
        changed["upstreams"]["shop"]["timeout"] = 1.0  # a new backend connection pool
        _write(config_file, changed)
        assert (await gw.admin.post("/reload", headers=AUTH)).status == 200

        async def settled() -> bool:
            record = await gw.runtime.snapshot.campaigns["phone-1111"].store.reservation(rid)
            return record is not None and record.state.value == "committed"

        await wait_for(settled, within=10)
        assert len(shop.seen) == 2
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.mark.integration
async def test_reloads_run_one_after_another_and_the_last_files_outcome_stays(
    settings_data: dict[str, Any], redis: Redis, reloadable: OpenGateway, config_file: Path
) -> None:
    async with reloadable() as gw:
        added = json.loads(json.dumps(settings_data))
        added["campaigns"].append(
            {"id": "tv-2222", "route": "POST /seckill/tv-2222", "upstream": "shop", "stock": 5}
        )
        _write(config_file, added)
        first = asyncio.ensure_future(gw.runtime.reloader.reload())
        await asyncio.sleep(0)  # one loop turn: the first is applying (it waits on Redis) ...
        broken = json.loads(json.dumps(added))
        broken["campaigns"][0]["stock"] = -5
        _write(config_file, broken)  # ... when a second SIGHUP reads a refused file
        outcomes = await asyncio.gather(first, gw.runtime.reloader.reload(), return_exceptions=True)
        assert not isinstance(outcomes[0], BaseException)
        assert isinstance(outcomes[1], ConfigError)
        assert "campaigns[0].stock" in (
            gw.runtime.readiness.reload_error or ""
        )  # not wiped by the first
        assert "tv-2222" in gw.runtime.snapshot.campaigns


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "path_in_error"),
    [
        (lambda d: d["campaigns"][0].update(stock=-1), "campaigns[0].stock"),
        (lambda d: d["gateway"].update(port=1), "gateway.port"),
        (lambda d: d.update(redis={"url": "redis://10.0.0.1:6379/0"}), "redis.url"),
        (lambda d: d["campaigns"][0].update(upstream="nowhere"), "campaigns[0].upstream"),
        (lambda d: d["admin"].update(metrics_need_token=True), "admin.metrics_need_token"),
    ],
    ids=["invalid", "port change", "redis change", "unknown upstream", "metrics token"],
)
async def test_a_refused_reload_keeps_the_running_config(
    settings_data: dict[str, Any],
    redis: Redis,
    reloadable: OpenGateway,
    config_file: Path,
    change: Any,
    path_in_error: str,
) -> None:
    async with reloadable() as gw:
        broken = json.loads(json.dumps(settings_data))
        change(broken)
        _write(config_file, broken)
        refused = await gw.admin.post("/reload", headers=AUTH)
        problem = await problem_of(refused)
        assert (refused.status, problem["code"]) == (422, "invalid-config")
        assert any(path_in_error in line for line in problem["problems"]), problem
        assert (await gw.buy("alice")).status == 201  # still serving the old config
        ready = await (await gw.admin.get("/readyz")).json()
        assert path_in_error in ready["last_reload_error"]


@pytest.mark.integration
async def test_reload_does_not_disturb_requests_in_flight(
    settings_data: dict[str, Any],
    redis: Redis,
    shop: Shop,
    reloadable: OpenGateway,
    config_file: Path,
) -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"ok": True}, status=201)

    shop.respond = slow
    async with reloadable() as gw:
        in_flight = asyncio.ensure_future(gw.buy("alice"))
        await wait_for(lambda: len(shop.seen) == 1)
        changed = json.loads(json.dumps(settings_data))
        changed["upstreams"]["shop"]["timeout"] = 5.0  # a new backend session
        changed["campaigns"][0]["per_user_limit"] = 3
        _write(config_file, changed)
        assert (await gw.admin.post("/reload", headers=AUTH)).status == 200
        gate.set()
        assert (await in_flight).status == 201
    state = await check_invariant(redis, "phone-1111", per_user_limit=3)
    assert state["sold"] == 1


@pytest.mark.e2e
@pytest.mark.slow
async def test_sighup_reloads_every_worker(
    process_config: dict[str, Any], run_gateway: Callable[..., GatewayProcess]
) -> None:
    gateway = run_gateway(process_config, "--workers", "2")
    try:
        added = json.loads(json.dumps(gateway.config))
        added["campaigns"].append(
            {"id": "tv-2222", "route": "POST /seckill/tv-2222", "upstream": "shop", "stock": 5}
        )
        gateway.config_path.write_text(yaml.safe_dump(added))
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)

        async def every_worker_knows() -> bool:
            for _ in range(10):  # new connections reach either worker
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.get(f"{gateway.admin_url}/campaigns/tv-2222", headers=AUTH) as response,
                ):
                    if response.status != 200:
                        return False
            return True

        await wait_for(every_worker_knows, within=10)

        # A refused file is answered by the worker asked, and every worker shows why.
        broken = json.loads(json.dumps(added))
        broken["campaigns"][0]["stock"] = -5
        gateway.config_path.write_text(yaml.safe_dump(broken))
        async with (
            aiohttp.ClientSession() as fresh,
            fresh.post(f"{gateway.admin_url}/reload", headers=AUTH) as response,
        ):
            assert response.status == 422
            assert (await response.json())["code"] == "invalid-config"

        async def every_worker_shows_the_refusal() -> bool:
            for _ in range(10):
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.get(f"{gateway.admin_url}/readyz") as response,
                ):
                    error = (await response.json()).get("last_reload_error") or ""
                    if "campaigns[0].stock" not in error:
                        return False
            return True

        await wait_for(every_worker_shows_the_refusal, within=10)
    finally:
        assert gateway.stop() == 0


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    workers = []
    for child in children:
        with contextlib.suppress(OSError):
            if b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
    return workers


@pytest.mark.e2e
@pytest.mark.slow
async def test_reloads_sent_while_a_worker_restarts_do_not_kill_it(
    process_config: dict[str, Any], run_gateway: Callable[..., GatewayProcess]
) -> None:
    gateway = run_gateway(process_config, "--workers", "2")
    try:
        assert gateway.process is not None
        supervisor = gateway.process.pid
        await wait_for(lambda: len(_workers(supervisor)) == 2, within=20)
        first = _workers(supervisor)
        os.kill(first[0], signal.SIGKILL)
        # reloads keep coming while the supervisor starts the replacement
        for _ in range(60):
            gateway.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.05)  # pacing the signals (the scenario), not a wait
        assert gateway.process.poll() is None  # the supervisor did not give up
        await wait_for(lambda: len(_workers(supervisor)) == 2, within=20)
        assert len(set(_workers(supervisor)) - set(first)) == 1
        # only the worker killed by the test died: no replacement was killed by a SIGHUP
        assert gateway.log().count("exited with") == 1, gateway.log()
    finally:
        assert gateway.stop() == 0


# --------------------------------------------------------------------------- status


@pytest.mark.e2e
def test_status_command(
    process_config: dict[str, Any], redis_server: EmbeddedRedis, config_file: Path
) -> None:
    path = config_file
    _write(path, process_config)
    env = {**os.environ}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "status", "-c", str(path), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )

    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    missing = run()
    assert missing.returncode == 0
    assert "not in Redis yet" in missing.stdout
    client = sync_redis.Redis.from_url(redis_server.url)
    client.hset(
        "fg:{phone-1111}:state",
        mapping={
            "available": 7,
            "reserved": 1,
            "sold": 2,
            "stock_total": 10,
        },
    )
    table = run()
    assert table.returncode == 0
    header, rule, row = table.stdout.splitlines()[:3]
    assert "stock total" in header
    assert set(rule) <= {"-", " "}
    assert row.split()[:7] == ["phone-1111", "10", "7", "1", "2", "ok", "no"]
    document = json.loads(run("--json").stdout)
    (campaign,) = document["campaigns"]
    assert (campaign["available"], campaign["sold"], campaign["sold_out"]) == (7, 2, False)
    assert campaign["balanced"] is True
    client.hset("fg:{phone-1111}:state", "available", 9)  # drift: 9 + 1 + 2 != 10
    drifting = run()
    assert drifting.stdout.splitlines()[2].split()[5] == "DRIFT"
    assert "the books do not balance for phone-1111" in drifting.stdout
    assert json.loads(run("--json").stdout)["campaigns"][0]["balanced"] is False
