"""Edge shaping across real gateway processes sharing one Redis."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from limiter.buckets import LEASE_TTL
from tests.helpers import AUTH, Gateway, Shop, check_invariant
from tests.processes import GatewayProcess

RATE = 100.0
CAPACITY = 10


def _config(settings_data: dict[str, Any], redis_url: str, **campaign: Any) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(json.dumps(settings_data))
    config["redis"] = {"url": redis_url}
    config["campaigns"][0].update(campaign)
    return config


async def _hammer(
    session: aiohttp.ClientSession, urls: list[str], seconds: float, concurrency: int
) -> tuple[dict[int, int], float]:
    """Distinct buyers for ``seconds`` against ``urls`` in turn; returns statuses and elapsed."""
    statuses: dict[int, int] = {}
    counter = iter(range(10**9))
    started = time.monotonic()
    stop_at = started + seconds

    async def worker(index: int) -> None:
        url = urls[index % len(urls)]
        while time.monotonic() < stop_at:
            user = f"buyer-{next(counter)}"
            async with session.post(url, headers={"X-User-Id": user}) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return statuses, time.monotonic() - started


@pytest.mark.e2e
@pytest.mark.slow
async def test_two_processes_hold_the_global_rate_within_the_bound(
    settings_data: dict[str, Any],
    redis_server: EmbeddedRedis,
    redis: Redis,
    shop: Shop,
    tmp_path: Path,
) -> None:
    config = _config(
        settings_data,
        redis_server.url,
        stock=100_000,
        per_user_limit=1,
        rate_limit={"rate": RATE, "per": "1s", "burst": CAPACITY},
    )
    first = GatewayProcess(json.loads(json.dumps(config)), tmp_path, "--workers", "1").start()
    second = GatewayProcess(json.loads(json.dumps(config)), tmp_path, "--workers", "1").start()
    try:
        urls = [f"{g.url}/seckill/phone-1111" for g in (first, second)]
        async with aiohttp.ClientSession() as session:
            statuses, elapsed = await _hammer(session, urls, seconds=2.0, concurrency=32)
    finally:
        first.stop()
        second.stop()
    admitted = statuses.get(201, 0)
    bound = CAPACITY + RATE * (elapsed + LEASE_TTL)
    print(f"admitted {admitted} in {elapsed:.2f}s; bound {bound:.0f}; statuses {statuses}")
    assert admitted == len(shop.seen)
    assert admitted <= bound
    assert admitted >= RATE * elapsed * 0.5  # the limiter lets the rate through, not less
    assert set(statuses) <= {201, 429}
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.mark.e2e
@pytest.mark.slow
async def test_workers_share_ports_and_the_global_rate(
    settings_data: dict[str, Any],
    redis_server: EmbeddedRedis,
    redis: Redis,
    shop: Shop,
    tmp_path: Path,
) -> None:
    config = _config(
        settings_data,
        redis_server.url,
        stock=100_000,
        rate_limit={"rate": RATE, "per": "1s", "burst": CAPACITY},
    )
    with GatewayProcess(config, tmp_path, "--workers", "2") as gateway:
        async with aiohttp.ClientSession() as session:
            statuses, elapsed = await _hammer(
                session, [f"{gateway.url}/seckill/phone-1111"], seconds=2.0, concurrency=32
            )
            seen_processes = set()
            for _ in range(40):  # new connections land on either worker
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.get(
                        f"{gateway.admin_url}/campaigns/phone-1111", headers=AUTH
                    ) as response,
                ):
                    seen_processes.add((await response.json())["process"]["id"])
    admitted = statuses.get(201, 0)
    assert admitted <= CAPACITY + RATE * (elapsed + LEASE_TTL)
    assert len(seen_processes) == 2
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.mark.e2e
@pytest.mark.slow
async def test_sold_out_broadcast_reaches_the_other_process_quickly(
    settings_data: dict[str, Any], redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    """A sells the last unit; B learns it is sold out (and stops asking Redis) within 100 ms."""
    ids = [f"c{i}" for i in range(5)]
    campaigns = [{"id": c, "route": f"POST /{c}", "upstream": "shop", "stock": 1} for c in ids]
    config = _config(settings_data, redis_server.url)
    config["campaigns"] = campaigns
    a = GatewayProcess(json.loads(json.dumps(config)), tmp_path, "--workers", "1").start()
    b = GatewayProcess(json.loads(json.dumps(config)), tmp_path, "--workers", "1").start()
    delays = []
    try:
        async with aiohttp.ClientSession() as session:
            for cid in ids:
                assert not await _locally_sold_out(session, b, cid)
                async with session.post(f"{a.url}/{cid}", headers={"X-User-Id": "u"}) as sale:
                    assert sale.status == 201
                sold_at = time.monotonic()
                while not await _locally_sold_out(session, b, cid):
                    assert time.monotonic() - sold_at < 5, "B never learned"
                delays.append(time.monotonic() - sold_at)
    finally:
        a.stop()
        b.stop()
    print("sold-out notice delays (ms):", [round(d * 1000, 1) for d in delays])
    assert statistics.median(delays) < 0.1


async def _locally_sold_out(
    session: aiohttp.ClientSession, gateway: GatewayProcess, cid: str
) -> bool:
    async with session.get(f"{gateway.admin_url}/campaigns/{cid}", headers=AUTH) as response:
        return bool((await response.json())["process"]["local_sold_out"])


@pytest.mark.integration
@pytest.mark.slow
async def test_burst_after_sell_out_makes_no_script_calls(gateway: Gateway, redis: Redis) -> None:
    for i in range(10):
        assert (await gateway.buy(f"user-{i}")).status == 201
    assert (await gateway.buy("late")).status == 409
    gateway.runtime.stop_background()  # heartbeats and sweeps are scripts too: keep them out
    await asyncio.sleep(0.05)
    before = await redis.info("commandstats")
    decided = await redis.hget("fg:{phone-1111}:state", "decided")

    url = str(gateway.edge.make_url("/seckill/phone-1111"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def one(i: int) -> int:
            async with session.post(url, headers={"X-User-Id": f"crowd-{i}"}) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(10_000)))
    after = await redis.info("commandstats")
    assert set(statuses) == {409}
    for command in ("cmdstat_evalsha", "cmdstat_eval"):
        assert after.get(command, {}).get("calls", 0) == before.get(command, {}).get("calls", 0)
    assert await redis.hget("fg:{phone-1111}:state", "decided") == decided
