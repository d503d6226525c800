"""The flashgate command as a user runs it: real processes, real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.embedded.server import free_port
from tests.helpers import ADMIN_TOKEN, AUTH, Shop, check_invariant, wait_for, wait_for_sync
from tests.processes import GatewayProcess, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def _buy(session: aiohttp.ClientSession, url: str, user: str) -> int:
    async with session.post(f"{url}/seckill/phone-1111", headers={"X-User-Id": user}) as response:
        await response.read()
        return response.status


async def _campaign(session: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    async with session.get(f"{admin_url}/campaigns/phone-1111", headers=AUTH) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def test_restarted_gateway_keeps_the_stock(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    shop: Shop,
) -> None:
    async with aiohttp.ClientSession() as session:
        gateway = run_gateway(process_config)
        statuses = [await _buy(session, gateway.url, f"user-{i}") for i in range(4)]
        assert statuses == [201] * 4
        await session.post(
            f"{gateway.admin_url}/campaigns/phone-1111/stock", headers=AUTH, json={"delta": 3}
        )
        assert gateway.stop() == 0
        # the file still says stock: 10; Redis says 13 total, 9 available: Redis wins
        again = run_gateway(process_config)
        document = await _campaign(session, again.admin_url)
        assert (document["stock_total"], document["available"], document["sold"]) == (13, 9, 4)
        assert await _buy(session, again.url, "user-0") == 403  # still at the limit
        assert await _buy(session, again.url, "user-new") == 201
    await check_invariant(redis, "phone-1111", per_user_limit=1)


async def test_sigterm_drains_and_exits_cleanly(
    process_config: dict[str, Any], run_gateway: Callable[..., GatewayProcess], shop: Shop
) -> None:
    from aiohttp import web

    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        # the backend's own slowness (the scenario): the order is in flight at the SIGTERM
        await asyncio.sleep(0.5)
        gate.set()
        return web.json_response({"ok": True}, status=201)

    shop.respond = slow
    gateway = run_gateway(process_config)
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(_buy(session, gateway.url, "alice"))
        await wait_for(lambda: len(shop.seen) == 1)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        assert await in_flight == 201  # the request in flight finished
    assert gateway.wait() == 0
    assert "stopping" in gateway.log()


def test_embedded_redis_lives_and_dies_with_the_gateway(
    settings_data: dict[str, Any], run_gateway: Callable[..., GatewayProcess], shop: Shop
) -> None:
    config: dict[str, Any] = json.loads(json.dumps(settings_data))
    config.pop("redis", None)  # absent: embedded
    gateway = run_gateway(config)
    redis_pid = _embedded_pid(gateway.log())
    assert pid_alive(redis_pid)
    assert gateway.stop() == 0
    assert not pid_alive(redis_pid)

    # kill -9 of the gateway cannot run its cleanup: the embedded Redis still goes
    gateway = run_gateway(config)
    redis_pid = _embedded_pid(gateway.log())
    gateway.kill()
    wait_for_sync(lambda: not pid_alive(redis_pid), within=5)


def _embedded_pid(log: str) -> int:
    found = re.findall(r"embedded redis-server \(pid (\d+)\)", log)
    assert found, log
    return int(found[-1])


def test_demo_reports_a_correct_sale() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--log-level",
            "warning",
            "demo",
            "--stock",
            "50",
            "--buyers",
            "400",
            "--requests",
            "1000",
            "--concurrency",
            "64",
            "--json",
        ],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    verdict = report["verdict"]
    assert verdict["correct"] is True
    assert (verdict["sold"], verdict["backend_units"], verdict["oversold"]) == (50, 50, 0)
    assert report["outcomes"]["sold-out"] > 0
    assert sum(report["outcomes"].values()) == report["requests"]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_the_demo_on_a_topology_sells_through_a_primary_killed_mid_sale(topology: str) -> None:
    demo = ["demo", "--redis", topology, "--stock", "60", "--rate", "60", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--log-level", "error", *demo],
        capture_output=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(result.stdout)
    verdict, failover = report["verdict"], report["failover"]
    assert verdict["correct"] is True
    assert (verdict["sold"], verdict["oversold"], verdict["acknowledged_lost"]) == (60, 0, 0)
    assert failover["killed"] != failover["promoted"] != ""
    assert failover["unavailable"] == report["outcomes"].get("unavailable", 0) > 0
    assert 0 < failover["sold_before"] < 60  # killed in the middle of the sale


def test_admin_token_comes_from_the_environment(
    process_config: dict[str, Any], run_gateway: Callable[..., GatewayProcess]
) -> None:
    process_config["admin"]["token"] = "${FLASHGATE_TEST_ADMIN_TOKEN}"
    os.environ["FLASHGATE_TEST_ADMIN_TOKEN"] = ADMIN_TOKEN
    try:
        gateway = run_gateway(process_config)
        import urllib.request

        request = urllib.request.Request(f"{gateway.admin_url}/campaigns", headers=AUTH)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    finally:
        del os.environ["FLASHGATE_TEST_ADMIN_TOKEN"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_stops_the_gateway_with_a_clear_message(
    process_config: dict[str, Any], tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process_config["gateway"]["port"] = port
        process_config["admin"]["port"] = 0 if workers == "1" else free_port()
        path = tmp_path / "taken.yaml"
        path.write_text(json.dumps(process_config))
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", workers],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 3, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert done.stderr.count("started (pid") <= int(workers)  # no restarts
    assert "Traceback" not in done.stderr
