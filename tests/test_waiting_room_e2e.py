"""The waiting room across two real gateway processes on one Redis: arrival order is
kept whichever gateway a waiter joins or polls at, and under 1,000 concurrent waiters
the passes never outnumber max_passes_per_unit x available while the sale stays exact."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.helpers import AUTH, Shop, check_invariant, wait_for
from tests.processes import GatewayProcess
from tests.waiting_room_helpers import QUEUE, QUEUE_KEYS, with_room

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STATE = "fg:{phone-1111}:state"
#: Unexpired unused passes and the stock, read in one atomic step (not the code under test).
RAW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'),
        tonumber(redis.call('HGET', KEYS[2], 'available'))}
"""


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as client:
        yield client


class Client:
    """One user of the waiting room, who may call either gateway."""

    def __init__(self, http: aiohttp.ClientSession, user: str) -> None:
        self.http = http
        self.user = user
        self.ticket = ""
        self.state = ""

    async def join(self, gateway: GatewayProcess) -> dict[str, Any]:
        async with self.http.post(
            gateway.url + QUEUE, headers={"X-User-Id": self.user}
        ) as response:
            document: dict[str, Any] = await response.json(content_type=None)
            assert response.status == 202, document
            self.ticket, self.state = document["ticket"], document["state"]
            return document

    async def poll(self, gateway: GatewayProcess) -> dict[str, Any]:
        async with self.http.get(
            gateway.url + QUEUE, params={"ticket": self.ticket}, headers={"X-User-Id": self.user}
        ) as response:
            document: dict[str, Any] = await response.json(content_type=None)
            assert response.status == 200, document
            self.state = document["state"]
            return document

    async def buy(self, gateway: GatewayProcess, pass_token: str) -> int:
        headers = {"X-User-Id": self.user, "X-Queue-Pass": pass_token}
        async with self.http.post(gateway.url + "/seckill/phone-1111", headers=headers) as r:
            await r.read()
            return r.status


async def test_fifo_keeps_arrival_order_across_two_gateway_processes(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
) -> None:
    process_config["campaigns"][0]["stock"] = 100
    with_room(process_config, admit_rate=10, max_passes_per_unit=1, heartbeat="60s")
    gateways = [run_gateway(process_config), run_gateway(process_config)]
    async with session() as http:
        clients = [Client(http, f"user-{i:02d}") for i in range(40)]
        for i, client in enumerate(clients):  # one after the other, alternating gateways
            await client.join(gateways[i % 2])
        while any(c.state != "admitted" for c in clients):
            for i, client in enumerate(clients):  # each polls the other gateway
                if client.state != "admitted":
                    await client.poll(gateways[(i + 1) % 2])
            await asyncio.sleep(0.1)  # a poll interval
    pairs = await redis.zrange(f"{QUEUE_KEYS}:passes", 0, -1, withscores=True)
    expiries = dict(cast(list[tuple[bytes, float]], pairs))
    admitted_at = [expiries[c.user.encode()] for c in clients]
    assert admitted_at == sorted(admitted_at), "a later arrival got its pass first"


async def test_passes_never_outnumber_the_rule_under_a_thousand_concurrent_waiters(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    shop: Shop,
) -> None:
    process_config["campaigns"][0]["stock"] = 50
    with_room(
        process_config,
        admit_rate=200,
        max_passes_per_unit=2,
        close_factor=30,
        pass_ttl="2s",
        heartbeat="30s",
    )
    gateways = [run_gateway(process_config), run_gateway(process_config)]
    buying = asyncio.Event()
    samples: list[tuple[int, int]] = []
    views: list[dict[str, Any]] = []
    async with session() as http:
        clients = [Client(http, f"user-{i:04d}") for i in range(1000)]
        waiters = [
            asyncio.create_task(wait_and_buy(c, gateways, i, buying)) for i, c in enumerate(clients)
        ]
        watching = asyncio.create_task(watch(redis, http, gateways, samples, views))
        # a while of waiting and polling, with passes that expire unused
        await wait_for(lambda: len(samples) >= 15 and _expired(views), within=60)
        raw_before_buying = list(samples)
        buying.set()
        outcomes = await asyncio.gather(*waiters)
        watching.cancel()
    # no buying: the stock stood still, and Redis itself never held more unused passes
    assert len(raw_before_buying) >= 10
    assert all(passes <= 2 * available for passes, available in raw_before_buying)
    assert max(passes for passes, _ in raw_before_buying) == 100  # the cap was reached
    # every gateway's view, buying or not: never above the rule of the same instant
    assert len(views) >= 10
    for view in views:
        assert view["passes_outstanding"] <= view["passes_cap"] == 2 * view["available"]
    # the sale is exact
    assert outcomes.count(201) == 50
    assert len(shop.seen) == 50
    state = await check_invariant(redis, "phone-1111", 1)
    assert (state["sold"], state["available"]) == (50, 0)


def _expired(views: list[dict[str, Any]]) -> bool:
    return bool(views) and views[-1]["passes_expired"] > 0


async def wait_and_buy(
    client: Client, gateways: list[GatewayProcess], i: int, buying: asyncio.Event
) -> int:
    """Join, poll as told (at either gateway); once admitted, buy when buying is open (a
    pass admitted before that expires unused). Returns 201 when it bought, else 0."""
    await asyncio.sleep(random.random())  # a crowd arriving over a second
    document = await client.join(gateways[i % 2])
    while True:
        if document["state"] in ("closed", "expired"):
            if document["state"] == "expired" and not buying.is_set():
                document = await client.join(gateways[i % 2])
                continue
            return 0
        if document["state"] == "admitted" and buying.is_set():
            status = await client.buy(gateways[(i + 1) % 2], document["pass"])
            if status == 201:
                return status
        await asyncio.sleep(min(float(document["poll_after"] or 1), 1.0))
        document = await client.poll(gateways[random.randrange(2)])


async def watch(
    redis: Redis,
    http: aiohttp.ClientSession,
    gateways: list[GatewayProcess],
    samples: list[tuple[int, int]],
    views: list[dict[str, Any]],
) -> None:
    """Redis's raw count of unused passes and the stock, atomically; and the admin API's
    view of the queue, alternately from both gateways."""
    n = 0
    while True:
        passes, available = await redis.eval(RAW, 2, f"{QUEUE_KEYS}:passes", STATE)
        samples.append((int(passes), int(available)))
        async with http.get(
            f"{gateways[n % 2].admin_url}/campaigns/phone-1111", headers=AUTH
        ) as response:
            document = await response.json()
            views.append(document["waiting_room"])
        n += 1
        await asyncio.sleep(0.1)  # a sampling interval
