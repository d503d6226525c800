"""Edge shaping across real gateway processes sharing one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.core.stockwatch import StockWatch
from gateway.embedded.server import EmbeddedRedis
from limiter.buckets import LEASE_TTL
from tests.helpers import AUTH, Gateway, Shop, check_invariant, open_gateway, settings_for, wait_for
from tests.processes import GatewayProcess

RATE = 100.0
CAPACITY = 10


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


async def _paced(
    session: aiohttp.ClientSession, urls: list[str], count: int, per_second: float
) -> list[int]:
    """``count`` distinct buyers one after another, taking turns at ``urls``, at most
    ``per_second`` of them a second (the pacing is the scenario); returns their statuses."""
    statuses = []
    for i in range(count):
        url = urls[i % len(urls)]
        async with session.post(url, headers={"X-User-Id": f"paced-{i}"}) as response:
            await response.read()
            statuses.append(response.status)
        await asyncio.sleep(1 / per_second)  # pacing traffic: not a wait for background work
    return statuses


@pytest.mark.e2e
@pytest.mark.slow
async def test_two_processes_hold_the_global_rate_within_the_bound(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    shop: Shop,
) -> None:
    process_config["campaigns"][0].update(
        stock=100_000,
        per_user_limit=1,
        rate_limit={"rate": RATE, "per": "1s", "burst": CAPACITY},
    )
    first = run_gateway(process_config, "--workers", "1")
    second = run_gateway(process_config, "--workers", "1")
    urls = [f"{g.url}/seckill/phone-1111" for g in (first, second)]
    async with aiohttp.ClientSession() as session:
        statuses, elapsed = await _hammer(session, urls, seconds=2.0, concurrency=32)
        # A pause of the scenario, not a wait for background work: the shared bucket refills
        # (capacity / rate = 0.1 s by Redis's clock; a second leaves room to spare).
        await asyncio.sleep(1.0)
        paced = await _paced(session, urls, count=25, per_second=RATE / 4)
    first.stop()
    second.stop()
    admitted = statuses.get(201, 0)
    bound = CAPACITY + RATE * (elapsed + LEASE_TTL)
    print(f"admitted {admitted} in {elapsed:.2f}s; bound {bound:.0f}; statuses {statuses}")
    assert admitted + len(paced) == len(shop.seen)
    assert admitted <= bound
    # the limiter lets the rate through, not less: buyers at a quarter of the rate, taking
    # turns at the two processes, are every one admitted (a limiter that let through less
    # than that, or starved one process, would refuse some of them)
    assert paced == [201] * 25
    assert set(statuses) <= {201, 429}
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.mark.e2e
@pytest.mark.slow
async def test_workers_share_ports_and_the_global_rate(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    shop: Shop,
) -> None:
    process_config["campaigns"][0].update(
        stock=100_000, rate_limit={"rate": RATE, "per": "1s", "burst": CAPACITY}
    )
    gateway = run_gateway(process_config, "--workers", "2")
    async with aiohttp.ClientSession() as session:
        statuses, elapsed = await _hammer(
            session, [f"{gateway.url}/seckill/phone-1111"], seconds=2.0, concurrency=32
        )
        seen_processes = set()
        for _ in range(40):  # new connections land on either worker
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.get(f"{gateway.admin_url}/campaigns/phone-1111", headers=AUTH) as response,
            ):
                seen_processes.add((await response.json())["process"]["id"])
    gateway.stop()
    admitted = statuses.get(201, 0)
    assert admitted <= CAPACITY + RATE * (elapsed + LEASE_TTL)
    assert len(seen_processes) == 2
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.mark.e2e
@pytest.mark.slow
async def test_sold_out_broadcast_reaches_the_other_process_quickly(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis_server: EmbeddedRedis,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A (a gateway process) sells the last unit; B learns it is sold out (and stops asking
    Redis) from A's notice alone: B never polls the counters, so nothing else can tell it.
    Quickly means by the notice, not by B's next poll (every 0.25 s)."""
    ids = [f"c{i}" for i in range(5)]
    campaigns = [{"id": c, "route": f"POST /{c}", "upstream": "shop", "stock": 1} for c in ids]
    process_config["campaigns"] = campaigns

    async def never_polls(self: StockWatch, campaigns: object) -> None:
        """B's poll of the counters is switched off: only a notice can set its flags."""

    monkeypatch.setattr(StockWatch, "poll", never_polls)
    a = run_gateway(process_config, "--workers", "1")
    async with open_gateway(settings_for(process_config), redis_server.url) as b:

        async def both_listen() -> bool:  # A's listener and B's, on every campaign's channel
            channels = [f"fg:{{{cid}}}:events" for cid in ids]
            subscribers = await redis.pubsub_numsub(*channels)
            return all(count == 2 for _, count in subscribers)

        await wait_for(both_listen, within=10)
        async with aiohttp.ClientSession() as session:
            for cid in ids:
                assert cid not in b.runtime.watch.sold_out
                async with session.post(f"{a.url}/{cid}", headers={"X-User-Id": "u"}) as sale:
                    assert sale.status == 201
                await wait_for(_locally_sold_out(b, cid), within=5)
                # and B answers from memory: the unit is gone, and no reserve call is made
                decided = await redis.hget(f"fg:{{{cid}}}:state", "decided")
                assert (await b.buy("v", path=f"/{cid}")).status == 409
                assert await redis.hget(f"fg:{{{cid}}}:state", "decided") == decided
    a.stop()


@pytest.mark.integration
@pytest.mark.slow
async def test_burst_after_sell_out_makes_no_script_calls(gateway: Gateway, redis: Redis) -> None:
    for i in range(10):
        assert (await gateway.buy(f"user-{i}")).status == 201
    assert (await gateway.buy("late")).status == 409
    gateway.runtime.stop_background()  # heartbeats and sweeps are scripts too: keep them out
    await wait_for(lambda: _no_script_lands(gateway, redis))
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


def _locally_sold_out(gateway: Gateway, cid: str) -> Callable[[], bool]:
    return lambda: cid in gateway.runtime.watch.sold_out


async def _script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(c, {}).get("calls", 0)) for c in ("cmdstat_evalsha", "cmdstat_eval"))


async def _no_script_lands(gateway: Gateway, redis: Redis) -> bool:
    """The stopped loops have ended, and no script call of theirs reaches Redis across a
    round trip of the gateway's own pipeline (one already sent would be counted by then)."""
    if not all(loop.done() for loop in gateway.runtime._loops):
        return False
    calls = await _script_calls(redis)
    await gateway.runtime.pipe.call("PING", what="ping")
    return await _script_calls(redis) == calls
