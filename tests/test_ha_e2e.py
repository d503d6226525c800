"""High availability, end to end: real ``flashgate run`` processes on real Redis Sentinel and
Redis Cluster topologies, with primaries killed (kill -9) and a slot migrated in the middle of
a sale.

Why end to end: the limiter-level tests (test_redis_topologies.py) show that the pipeline
follows a failover or a slot; only whole gateways show what a buyer is told meanwhile, that a
201 is a sale the promoted primary still has, that the books balance afterwards, and that the
gateways resume on their own. Each test checks the books against Redis directly
(``check_invariant``) on the node that owns the campaign once the traffic has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis import RedisError
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.embedded.topology import ClusterTopology, SentinelTopology
from limiter.keys import CampaignKeys
from tests.helpers import ADMIN_TOKEN, AUTH, Shop, as_text, check_invariant, text, wait_for
from tests.processes import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RunGateway = Callable[..., GatewayProcess]
#: Every gateway of this file is one process (``--workers 1``): two of them are two gateways.
ONE_WORKER = ("--workers", "1")
#: A purchase's client-side bound: the gateway answers within redis.timeout plus the backend's.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
#: Longer than any failover here (a node is down after about 1 s): a reservation whose answer
#: was lost is undone by its own gateway once Redis answers, not redelivered by a sweeper.
FORWARD_DEADLINE = "10s"
#: What a failover or a migration may do to a buyer: fail closed (nothing sold).
FAIL_CLOSED = "503 unavailable"
#: A decision counts once a replica has it (docs/operations.md, "Redis failover"); the call
#: deadline leaves room for the WAIT.
DURABLE = {"wait_for_replicas": 1, "replica_timeout": "200ms", "timeout": "1s"}


# --- configuration ----------------------------------------------------------------------


def _config(
    shop: Shop, redis_url: str, campaigns: list[dict[str, Any]], **redis: Any
) -> dict[str, Any]:
    """A gateway config on ``redis_url`` (free ports: GatewayProcess picks them)."""
    return {
        "redis": {"url": redis_url, **redis},
        "gateway": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
        "identity": {"header": "X-User-Id"},
        "upstreams": {"shop": {"url": shop.url, "timeout": 5.0}},
        "campaigns": campaigns,
    }


def _campaign(campaign_id: str, stock: int, **options: Any) -> dict[str, Any]:
    """One unit per buyer, one per request: every 201 is exactly one unit sold."""
    return {
        "id": campaign_id,
        "route": f"POST /buy/{campaign_id}",
        "upstream": "shop",
        "stock": stock,
        "per_user_limit": 1,
        "max_quantity": 1,
        "forward_deadline": FORWARD_DEADLINE,
        **options,
    }


def _start(run_gateway: RunGateway, config: dict[str, Any], *args: str) -> list[GatewayProcess]:
    """Two gateway processes on one config: what one sells, the other must know."""
    return [run_gateway(config, *ONE_WORKER, *args) for _ in range(2)]


# --- buyers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one buyer was told."""

    campaign: str
    status: int  #: 0: no HTTP answer at all (connection lost, client timeout)
    code: str | None  #: the problem's code; None for a success or a body that is not a problem
    reservation_id: str | None
    retry_after: str | None
    sent: float  #: time.monotonic() when the request left
    body: str = ""

    @property
    def label(self) -> str:
        """``201``, ``503 unavailable``, ``502 (not problem+json)``: for tallies and messages."""
        if self.status == 0:
            return f"no answer ({self.body})"
        if self.status < 400:
            return str(self.status)
        if self.code is None:
            return f"{self.status} (not problem+json)"
        if self.status == 503 and self.retry_after is None:
            return f"503 {self.code} without Retry-After"
        return f"{self.status} {self.code}"


def _problem_code(content_type: str, body: bytes, status: int) -> str | None:
    """The RFC 9457 document's code, or None when it is not a well-formed problem+json."""
    if content_type != "application/problem+json":
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("status") != status:
        return None
    if not {"type", "title", "status", "detail", "code"} <= document.keys():
        return None
    return str(document["code"])


async def _buy(
    session: aiohttp.ClientSession, gateway: GatewayProcess, campaign_id: str, user: str
) -> Answer:
    """One purchase with an Idempotency-Key of its own (a client that would retry safely)."""
    sent = time.monotonic()
    headers = {"X-User-Id": user, "Idempotency-Key": f"key-{user}"}
    try:
        async with session.post(f"{gateway.url}/buy/{campaign_id}", headers=headers) as response:
            body = await response.read()
            code = _problem_code(response.content_type, body, response.status)
            return Answer(
                campaign_id,
                response.status,
                code if response.status >= 400 else None,
                response.headers.get("X-Reservation-Id"),
                response.headers.get("Retry-After"),
                sent,
                body[:300].decode(errors="replace"),
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer(campaign_id, 0, None, None, None, sent, repr(exc))


@dataclass
class Crowd:
    """Distinct buyers of one campaign, one request each, taking turns at the gateways.

    Bounded: ``concurrency`` buyers at a time, each pausing ``pause`` s between requests (the
    pace of the scenario, so that a sale outlasts a failover), at most ``limit`` requests and
    ``seconds`` s in all; ``until_sold_out`` also ends it at its first sold-out answer.
    """

    session: aiohttp.ClientSession
    gateways: Sequence[GatewayProcess]
    campaign_id: str
    limit: int
    seconds: float
    concurrency: int = 8
    pause: float = 0.0
    until_sold_out: bool = False
    answers: list[Answer] = field(default_factory=list)
    #: run() has returned: sold out, out of requests or time, or stopped.
    done: bool = False
    _stopped: bool = False
    _issued: int = 0

    def wins(self, since: float = 0.0) -> list[str]:
        """Reservation ids of the 201s to requests sent at ``since`` or later."""
        return [
            a.reservation_id
            for a in self.answers
            if a.status == 201 and a.reservation_id and a.sent >= since
        ]

    def tally(self) -> Counter[str]:
        return Counter(a.label for a in self.answers)

    @property
    def saw_sold_out(self) -> bool:
        return any(a.code == "sold-out" for a in self.answers)

    def stop(self) -> None:
        self._stopped = True

    async def run(self) -> None:
        deadline = time.monotonic() + self.seconds

        async def buyer() -> None:
            while not self._stopped and self._issued < self.limit:
                if time.monotonic() >= deadline:
                    return
                number, self._issued = self._issued, self._issued + 1
                gateway = self.gateways[number % len(self.gateways)]
                user = f"{self.campaign_id}-buyer-{number}"
                answer = await _buy(self.session, gateway, self.campaign_id, user)
                self.answers.append(answer)
                if self.until_sold_out and answer.code == "sold-out":
                    self._stopped = True
                if self.pause:
                    await asyncio.sleep(self.pause)  # the crowd's pace: part of the scenario

        try:
            await asyncio.gather(*(buyer() for _ in range(self.concurrency)))
        finally:
            self.done = True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Crowd]:
        """The crowd buys while the block runs; leaving the block stops it and waits for the
        requests in flight (also when the block fails)."""
        task = asyncio.ensure_future(self.run())
        try:
            yield self
        finally:
            self.stop()
            await task


@contextlib.asynccontextmanager
async def _client_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=REQUEST_TIMEOUT, connector=aiohttp.TCPConnector(limit=64)
    ) as session:
        yield session


def _never_restarted(gateways: Iterable[GatewayProcess]) -> None:
    """Each gateway is the process the test started, still running: it resumed by itself."""
    for gateway in gateways:
        assert gateway.process is not None, gateway.log()
        assert gateway.process.poll() is None, gateway.log()


def _reservation(answer: Answer, status: int) -> str:
    """The reservation id of an answer that must have ``status``."""
    assert answer.status == status, answer
    assert answer.reservation_id is not None, answer
    return answer.reservation_id


def _unexpected(answers: Iterable[Answer], allowed: set[str]) -> list[Answer]:
    """The answers whose label is not among ``allowed`` (each reported with its body)."""
    return [a for a in answers if a.label not in allowed]


# --- Redis, read directly ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def _node(port: int) -> AsyncIterator[Redis]:
    """A plain client of one data node (the owner of a campaign's slot)."""
    client = Redis(port=port)
    try:
        yield client
    finally:
        await client.aclose()


async def _states(port: int, campaign_id: str, rids: Iterable[str]) -> dict[str, str | None]:
    """The state of each reservation's record on the node at ``port`` (None: no record)."""
    keys = CampaignKeys(campaign_id)
    wanted = list(rids)
    async with _node(port) as node:
        pipe = node.pipeline(transaction=False)
        for rid in wanted:
            pipe.hget(keys.reservation(rid), "state")
        values = await pipe.execute()
    return {rid: text(v) if v is not None else None for rid, v in zip(wanted, values, strict=True)}


async def _figures(port: int, campaign_id: str) -> dict[str, int]:
    async with _node(port) as node:
        raw = as_text(await node.hgetall(CampaignKeys(campaign_id).state))
    return {k: int(v) for k, v in raw.items() if k != "created_ms"}


async def _settled(
    port: Callable[[], int], campaign_id: str, notes: Callable[[], str], within: float = 30.0
) -> None:
    """Until nothing of the campaign is in flight (reserved == 0) on its owner: the quiescent
    point where the invariant must hold. ``port`` is asked each time (the owner may move);
    on failure the message shows the reservations still in flight and ``notes()``."""

    async def quiet() -> bool:
        try:
            return (await _figures(port(), campaign_id)).get("reserved") == 0
        except (RedisError, OSError):  # a node that is not up yet: not quiet yet
            return False

    try:
        await wait_for(quiet, within=within)
    except AssertionError:
        where = port()
        stuck = await _in_flight(where, campaign_id)
        raise AssertionError(
            f"{campaign_id} still has reservations in flight on port {where} after {within}s: "
            f"{await _figures(where, campaign_id)}; records {stuck}; {notes()}"
        ) from None


async def _in_flight(port: int, campaign_id: str, most: int = 5) -> list[dict[str, str]]:
    """Up to ``most`` records still reserved or held (the kept order left out), for messages."""
    found: list[dict[str, str]] = []
    async with _node(port) as node:
        async for key in node.scan_iter(match=f"{CampaignKeys(campaign_id).base}:r:*", count=1000):
            record = {text(k): text(v)[:80] for k, v in (await node.hgetall(key)).items()}
            if record.get("state") in ("reserved", "held") and len(found) < most:
                found.append({k: v for k, v in record.items() if "order" not in k})
    return found


def _notes(gateways: Iterable[GatewayProcess], last: int = 15) -> str:
    """The last lines each gateway logged besides its access log, for failure messages."""
    parts = []
    for gateway in gateways:
        lines = [line for line in gateway.log().splitlines() if not line.startswith("{")]
        parts.append(f"{gateway.log_path.name}:\n" + "\n".join(lines[-last:]))
    return "gateway logs:\n" + "\n".join(parts)


async def _until(condition: Callable[[], Any], within: float, what: Callable[[], str]) -> None:
    """``wait_for`` with a message that says what did not happen, and what was seen."""
    try:
        await wait_for(condition, within=within)
    except AssertionError:
        raise AssertionError(f"not within {within}s: {what()}") from None


def _accepted(shop: Shop, campaign_id: str) -> set[str]:
    """Reservations the backend accepted (the test shop accepts every order it gets)."""
    return {
        s.headers["X-Reservation-Id"]
        for s in shop.seen
        if s.headers.get("X-Campaign-Id") == campaign_id
    }


async def _books_hold(
    port: int, campaign_id: str, wins: list[str], shop: Shop, summary: str
) -> dict[str, int]:
    """Every 201 names a committed reservation on the node at ``port``; the books balance
    there; what was sold is what the backend accepted. Returns the counters."""
    states = await _states(port, campaign_id, wins)
    lost = {rid: state for rid, state in states.items() if state != "committed"}
    assert not lost, (
        f"{campaign_id}: {len(lost)} acknowledged sales (201) not committed on port {port} "
        f"(reservation: state) {dict(list(lost.items())[:10])}; {summary}"
    )
    async with _node(port) as node:
        books = await check_invariant(node, campaign_id, per_user_limit=1)
    accepted = _accepted(shop, campaign_id)
    assert books["sold"] == len(accepted) == len(wins), (
        f"{campaign_id}: books {books}, {len(accepted)} accepted by the backend, "
        f"{len(wins)} 201s; {summary}"
    )
    return books


# --- the flashgate command ---------------------------------------------------------------


async def _flashgate(*args: str, within: float = 60.0) -> tuple[int, str, str]:
    """``flashgate ARGS`` to its end (killed by PID if it outlives ``within``)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"flashgate {' '.join(args)} did not end within {within}s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _reconciled(config: Path) -> None:
    code, out, err = await _flashgate("reconcile", "-c", str(config))
    assert code == 0, f"reconcile exited {code}:\n{out}\n{err}"


@contextlib.contextmanager
def _dispatcher(config: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``flashgate dispatch -c FILE`` in a child process while the block runs; stopped by PID
    with SIGTERM (it must exit 0), killed if it does not stop."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "dispatch", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"flashgate dispatch ignored SIGTERM: {log_path}") from None
    assert process.returncode == 0, log_path.read_text(errors="replace")


# --- 1 and 2: a Sentinel failover in the middle of a sale ---------------------------------

SENTINEL_CAMPAIGN = "ha-sentinel"
SENTINEL_STOCK = 300
WINS_AFTER_FAILOVER = 20


@dataclass
class SentinelSale:
    """A sale through two gateways with the primary killed once a third was sold."""

    crowd: Crowd
    gateways: list[GatewayProcess]
    killed: int  #: the killed primary's port
    killed_at: float
    failed_over_at: float
    promoted: int  #: the primary the failover promoted
    primary: int  #: the primary at the quiescent point (the same one, unless Sentinel moved on)

    def summary(self) -> str:
        wins = self.crowd.wins()
        before = len(wins) - len(self.crowd.wins(since=self.killed_at))
        after = len(self.crowd.wins(since=self.failed_over_at))
        tally = self.crowd.tally()
        moved = "" if self.primary == self.promoted else f", then {self.primary}"
        return (
            f"201s: {len(wins)} ({before} sent before the kill, {after} sent after the failover); "
            f"503s: {tally.get(FAIL_CLOSED, 0)}; answers {dict(tally)}; primary {self.killed} "
            f"killed, {self.promoted} promoted{moved}"
        )


async def _sentinel_sale(
    sentinel: SentinelTopology, run_gateway: RunGateway, shop: Shop, wait_for_replicas: int
) -> SentinelSale:
    """Sell through two gateways, kill -9 the primary after about a third, keep buying until
    the failover is over and buyers win again (no gateway restarted), then stop at a quiescent
    point."""
    redis = {**DURABLE, "wait_for_replicas": wait_for_replicas}
    campaigns = [_campaign(SENTINEL_CAMPAIGN, SENTINEL_STOCK)]
    gateways = _start(run_gateway, _config(shop, sentinel.url, campaigns, **redis))
    async with _client_session() as session:
        crowd = Crowd(
            session, gateways, SENTINEL_CAMPAIGN, limit=5000, seconds=60, concurrency=8, pause=0.05
        )
        async with crowd.running():
            await _until(
                lambda: len(crowd.wins()) >= SENTINEL_STOCK // 3,
                30,
                lambda: f"a third sold; answers {dict(crowd.tally())}; {_notes(gateways)}",
            )
            killed_at = time.monotonic()
            killed = sentinel.kill_primary()
            promoted = await asyncio.to_thread(sentinel.wait_for_failover, killed)
            failed_over_at = time.monotonic()
            await _until(
                lambda: len(crowd.wins(since=failed_over_at)) >= WINS_AFTER_FAILOVER,
                40,
                lambda: (
                    f"buyers win after the failover to {promoted}; answers "
                    f"{dict(crowd.tally())}; {_notes(gateways)}"
                ),
            )
    await _settled(lambda: sentinel.primary().port, SENTINEL_CAMPAIGN, lambda: _notes(gateways))
    # The primary now: every running Sentinel names it and it says it is master. (In one run
    # Sentinel named another primary later than the one wait_for_failover had returned.)
    primary = await asyncio.to_thread(sentinel.wait_for_failover, killed)
    return SentinelSale(crowd, gateways, killed, killed_at, failed_over_at, promoted, primary)


async def test_sentinel_failover_mid_sale_loses_no_acknowledged_sale(
    fresh_sentinel: Callable[..., SentinelTopology], run_gateway: RunGateway, shop: Shop
) -> None:
    """wait_for_replicas: 1. Every 201 is a committed reservation on the promoted primary;
    nothing is oversold; during the switch buyers are only told 503 unavailable (Retry-After);
    both gateways resume by themselves; reconcile finds the books whole."""
    sentinel = fresh_sentinel()
    sale = await _sentinel_sale(sentinel, run_gateway, shop, wait_for_replicas=1)
    summary = sale.summary()
    print(f"\n[sentinel, wait_for_replicas 1] {summary}")

    wrong = _unexpected(sale.crowd.answers, {"201", FAIL_CLOSED})
    assert not wrong, f"{summary}; unexpected answers: {wrong[:5]}"
    _never_restarted(sale.gateways)

    books = await _books_hold(sale.primary, SENTINEL_CAMPAIGN, sale.crowd.wins(), shop, summary)
    assert books["sold"] <= SENTINEL_STOCK, f"books {books}; {summary}"
    await _reconciled(sale.gateways[0].config_path)


async def test_sentinel_failover_without_waiting_for_replicas_counts_lost_sales(
    fresh_sentinel: Callable[..., SentinelTopology], run_gateway: RunGateway, shop: Shop
) -> None:
    """wait_for_replicas: 0, the same sale: replication is asynchronous, so acknowledged
    sales may be missing on the promoted primary. The figure is for docs/consistency.md; the
    only assertion is that the books balance on what the promoted primary has."""
    sentinel = fresh_sentinel()
    sale = await _sentinel_sale(sentinel, run_gateway, shop, wait_for_replicas=0)
    wins = sale.crowd.wins()
    states = await _states(sale.primary, SENTINEL_CAMPAIGN, wins)
    missing = sum(state != "committed" for state in states.values())
    print(
        f"\n[HA figure] Sentinel failover (kill -9 of the primary mid-sale) with "
        f"redis.wait_for_replicas: 0: {missing} of {len(wins)} acknowledged sales (201) "
        f"missing on the promoted primary; {sale.summary()}"
    )
    async with _node(sale.primary) as node:
        await check_invariant(node, SENTINEL_CAMPAIGN, per_user_limit=1)


# --- 3: a Cluster slot migrated and another shard's primary killed mid-sale -------------------

#: Keys of the migrating slot moved before the other primary is killed: the slot is then half
#: migrated (its campaign fails closed) across that failover.
KEYS_BEFORE_THE_KILL = 10
#: Stock of the migrated and the killed campaigns; the untouched one has three times as much,
#: so that it is still selling through the whole disruption.
CLUSTER_STOCK = 100


def _campaign_on_each_primary(cluster: ClusterTopology, prefix: str) -> list[str]:
    """One campaign id per primary (in the primaries' order): the first ``prefix-N`` whose
    hash tag ``fg:{<id>}:state`` lands on it."""
    primaries = cluster.primaries()
    found: dict[int, str] = {}
    number = 0
    while len(found) < len(primaries):
        campaign_id = f"{prefix}-{number}"
        found.setdefault(cluster.primary_for_key(CampaignKeys(campaign_id).state), campaign_id)
        number += 1
    return [found[port] for port in primaries]


async def _migrate_and_kill(cluster: ClusterTopology, slot: int, target: int, victim: int) -> None:
    """Begin moving ``slot`` to ``target``, kill -9 ``victim`` halfway, finish the move once
    the victim's replica took over (the finish tells every primary, so it needs them up).
    Blocking topology calls run in threads: the crowds keep buying meanwhile."""
    await asyncio.to_thread(cluster.begin_migration, slot, target)
    await asyncio.to_thread(
        cluster.move_keys, slot, target, KEYS_BEFORE_THE_KILL, pause_between_keys=0.05
    )
    cluster.kill(victim)
    await asyncio.to_thread(cluster.wait_for_failover, victim)
    await asyncio.to_thread(cluster.finish_migration, slot, target, pause_between_keys=0.02)


async def _sell_the_rest(
    new_crowd: Callable[[], Crowd], owner: Callable[[], int], cid: str, notes: Callable[[], str]
) -> None:
    """After a sold-out answer, a reservation its gateway could not confirm (a 503) may still be
    given back: once the campaign is quiet, a fresh crowd buys what came back (at most thrice)."""
    for _ in range(3):
        await _settled(owner, cid, notes)
        if (await _figures(owner(), cid))["available"] == 0:
            return
        async with new_crowd().running() as crowd:
            await wait_for(_ended(crowd), within=30)


def _ended(crowd: Crowd) -> Callable[[], bool]:
    """A condition for wait_for: the crowd is done."""
    return lambda: crowd.done


async def test_cluster_slot_migration_and_primary_kill_mid_sale(
    fresh_cluster: Callable[..., ClusterTopology], run_gateway: RunGateway, shop: Shop
) -> None:
    """Three campaigns on three primaries sold at once through two gateways; one campaign's
    slot migrates and another campaign's primary is killed meanwhile. Each sells exactly its
    stock; every 201 is committed on the node that owns the campaign now; only fail-closed
    503s besides sales and refusals; the untouched campaign never fails; reconcile is clean."""
    cluster = fresh_cluster()
    migrated, killed, untouched = ids = _campaign_on_each_primary(cluster, "ha-cl")

    def owner_of(campaign_id: str) -> int:
        return cluster.primary_for_key(CampaignKeys(campaign_id).state)

    victim, target = owner_of(killed), owner_of(untouched)
    stock = {migrated: CLUSTER_STOCK, killed: CLUSTER_STOCK, untouched: 3 * CLUSTER_STOCK}
    campaigns = [_campaign(c, stock[c]) for c in ids]
    gateways = _start(run_gateway, _config(shop, cluster.url, campaigns, **DURABLE))
    crowds: dict[str, list[Crowd]] = {c: [] for c in ids}
    async with _client_session() as session:

        def crowd(campaign_id: str, limit: int = 2000) -> Crowd:
            made = Crowd(
                session,
                gateways,
                campaign_id,
                limit,
                seconds=60,
                concurrency=2,
                pause=0.08,
                until_sold_out=True,
            )
            crowds[campaign_id].append(made)
            return made

        first = [crowd(c) for c in ids]
        async with contextlib.AsyncExitStack() as stack:
            for each in first:
                await stack.enter_async_context(each.running())
            await _until(
                lambda: min(len(c.wins()) for c in first[:2]) >= CLUSTER_STOCK // 4,
                30,
                lambda: (
                    f"a quarter sold; answers {[dict(c.tally()) for c in first]}; "
                    f"{_notes(gateways)}"
                ),
            )
            disrupted = time.monotonic()
            slot = key_slot(CampaignKeys(migrated).state.encode())
            await _migrate_and_kill(cluster, slot, target, victim)
            recovered = time.monotonic()
            for each in first:
                await _until(
                    _ended(each),
                    60,
                    lambda: (
                        f"the crowds sold out: {[dict(c.tally()) for c in first]}; "
                        f"{_notes(gateways)}"
                    ),
                )
        for c in ids:
            await _sell_the_rest(
                functools.partial(crowd, c, 200),
                functools.partial(owner_of, c),
                c,
                functools.partial(_notes, gateways),
            )

    every = {c: [a for made in crowds[c] for a in made.answers] for c in ids}
    meanwhile = len([a for a in every[untouched] if disrupted <= a.sent <= recovered])
    tallies = {c: dict(Counter(a.label for a in every[c])) for c in ids}
    summary = f"answers per campaign {tallies}; {meanwhile} to {untouched} during the disruption"
    print(f"\n[cluster] migrated {migrated}, killed {killed}, untouched {untouched}; {summary}")
    allowed = {"201", "409 sold-out", "403 limit-exceeded", FAIL_CLOSED}
    for c in ids:
        wrong = _unexpected(every[c], allowed)
        assert not wrong, f"{c}: unexpected answers {wrong[:5]}; {summary}"
    assert not [a for a in every[untouched] if a.status == 503], summary
    assert meanwhile > 0, f"the untouched campaign was not selling during the disruption; {summary}"

    for c in ids:
        wins = [a.reservation_id for a in every[c] if a.status == 201 and a.reservation_id]
        books = await _books_hold(owner_of(c), c, wins, shop, summary)
        assert books["sold"] <= stock[c], f"{c}: {books}; {summary}"
        if crowds[c][-1].saw_sold_out:  # the crowd was large enough: every unit is sold
            assert books["sold"] == stock[c], f"{c}: {books}; {summary}"
    assert owner_of(migrated) == target, f"slot of {migrated} not on port {target}"
    _never_restarted(gateways)
    await _reconciled(gateways[0].config_path)


# --- 4: queue mode, hold/confirm/expiry, the sold-out broadcast and the CLI, on both ---------


@dataclass(frozen=True)
class Shared:
    """A session-wide topology (left healthy: nothing here kills or moves anything)."""

    name: str
    url: str
    owner: Callable[[str], int]  #: campaign id -> the port of the node holding its keys


@pytest.fixture(params=["sentinel", "cluster"])
def shared(request: pytest.FixtureRequest) -> Shared:
    """The shared Sentinel or Cluster topology; campaign ids carry its name, so that tests on
    one topology never see each other's keys."""
    if request.param == "sentinel":
        sentinel: SentinelTopology = request.getfixturevalue("sentinel_topology")
        return Shared("sentinel", sentinel.url, lambda _campaign_id: sentinel.primary().port)
    cluster: ClusterTopology = request.getfixturevalue("cluster_topology")
    return Shared(
        "cluster",
        cluster.url,
        lambda campaign_id: cluster.primary_for_key(CampaignKeys(campaign_id).state),
    )


async def _admin(
    session: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str
) -> tuple[int, dict[str, Any]]:
    async with session.request(method, f"{gateway.admin_url}{path}", headers=AUTH) as response:
        document: dict[str, Any] = await response.json(content_type=None)
        return response.status, document


async def _locally_sold_out(
    session: aiohttp.ClientSession, gateway: GatewayProcess, campaign_id: str
) -> bool:
    status, document = await _admin(session, gateway, "GET", f"/campaigns/{campaign_id}")
    assert status == 200, document
    return bool(document["process"]["local_sold_out"])


async def _state_is(shared: Shared, campaign_id: str, rid: str, state: str) -> bool:
    return (await _states(shared.owner(campaign_id), campaign_id, [rid]))[rid] == state


async def test_queue_hold_expiry_and_the_sold_out_broadcast(
    shared: Shared, run_gateway: RunGateway, shop: Shop
) -> None:
    """On Sentinel and on Cluster: a queued order is delivered by a gateway's dispatcher and
    committed; a held one is confirmed through the admin API; a short hold expires back to
    stock (and its late confirm is refused); A selling the last unit makes B answer sold-out
    from memory, B never asked to buy."""
    queue, hold, expiry, broadcast = (
        f"ha-{shared.name}-{kind}" for kind in ("queue", "hold", "expiry", "broadcast")
    )
    campaigns = [
        _campaign(queue, 5, forward="queue", retry_backoff="100ms"),
        _campaign(hold, 5, on_success="hold", hold_seconds="10m"),
        _campaign(expiry, 1, on_success="hold", hold_seconds="1s"),
        _campaign(broadcast, 2),
    ]
    a, b = _start(run_gateway, _config(shop, shared.url, campaigns, **DURABLE))
    async with _client_session() as session:
        queued = _reservation(await _buy(session, a, queue, "queue-buyer"), 202)
        await wait_for(lambda: _state_is(shared, queue, queued, "committed"), within=20)
        assert _accepted(shop, queue) == {queued}

        held = _reservation(await _buy(session, a, hold, "hold-buyer"), 201)
        assert await _state_is(shared, hold, held, "held")
        status, confirmed = await _admin(session, b, "POST", f"/reservations/{held}/confirm")
        assert (status, confirmed.get("confirmed_now")) == (200, True), confirmed
        assert await _state_is(shared, hold, held, "committed")

        lapsing = _reservation(await _buy(session, a, expiry, "expiry-buyer"), 201)
        await wait_for(lambda: _state_is(shared, expiry, lapsing, "expired"), within=15)
        status, late = await _admin(session, b, "POST", f"/reservations/{lapsing}/confirm")
        assert (status, late.get("code")) == (409, "expired"), late

        assert not await _locally_sold_out(session, b, broadcast)
        for number in range(2):
            sale = await _buy(session, a, broadcast, f"broadcast-buyer-{number}")
            assert sale.status == 201, sale
        await wait_for(lambda: _locally_sold_out(session, b, broadcast), within=5)

    for campaign_id, sold, available in (
        (queue, 1, 4),
        (hold, 1, 4),
        (expiry, 0, 1),
        (broadcast, 2, 0),
    ):
        async with _node(shared.owner(campaign_id)) as node:
            books = await check_invariant(node, campaign_id, per_user_limit=1)
        assert (books["sold"], books["available"], books["reserved"]) == (sold, available, 0), (
            campaign_id,
            books,
        )


async def test_cli_status_reconcile_and_dispatch(
    shared: Shared, run_gateway: RunGateway, shop: Shop, tmp_path: Path
) -> None:
    """On Sentinel and on Cluster, gateways running with --no-dispatch: queued orders wait
    until ``flashgate dispatch`` delivers them; ``status --json`` shows the counters before
    and after; ``reconcile`` exits 0."""
    queue, direct = f"ha-{shared.name}-cli-queue", f"ha-{shared.name}-cli-sync"
    campaigns = [_campaign(queue, 5, forward="queue", retry_backoff="100ms"), _campaign(direct, 3)]
    gateways = _start(run_gateway, _config(shop, shared.url, campaigns, **DURABLE), "--no-dispatch")
    config = gateways[0].config_path
    async with _client_session() as session:
        rids = {
            _reservation(await _buy(session, gateways[n % 2], queue, f"cli-buyer-{n}"), 202)
            for n in range(3)
        }
        _reservation(await _buy(session, gateways[1], direct, "cli-direct-buyer"), 201)
    assert not _accepted(shop, queue)  # no dispatcher runs anywhere yet

    assert await _status(config) == {
        queue: {"stock_total": 5, "available": 2, "reserved": 3, "sold": 0},
        direct: {"stock_total": 3, "available": 2, "reserved": 0, "sold": 1},
    }
    with _dispatcher(config, tmp_path / "dispatch.log"):
        await wait_for(lambda: _all_committed(shared, queue, rids), within=20)
    assert _accepted(shop, queue) == rids
    assert (await _status(config))[queue] == {
        "stock_total": 5,
        "available": 2,
        "reserved": 0,
        "sold": 3,
    }
    await _reconciled(config)
    for campaign_id in (queue, direct):
        async with _node(shared.owner(campaign_id)) as node:
            await check_invariant(node, campaign_id, per_user_limit=1)


async def _status(config: Path) -> dict[str, dict[str, int]]:
    """``flashgate status --json``: each campaign's counters."""
    code, out, err = await _flashgate("status", "-c", str(config), "--json")
    assert code == 0, f"status exited {code}:\n{out}\n{err}"
    rows = json.loads(out)["campaigns"]
    counters = ("stock_total", "available", "reserved", "sold")
    return {row["id"]: {name: row[name] for name in counters} for row in rows}


async def _all_committed(shared: Shared, campaign_id: str, rids: set[str]) -> bool:
    states = await _states(shared.owner(campaign_id), campaign_id, rids)
    return set(states.values()) == {"committed"}
