"""A flash crowd: thousands of concurrent buyers, exactly the stock sold."""

from __future__ import annotations

import asyncio
import collections
import random

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.helpers import Gateway, Shop, check_invariant, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STOCK = 300
REQUESTS = 5000
USERS = 2500


@pytest.fixture
def crowd_sale(settings_data: dict[str, object]) -> None:
    # Correctness under load is the point here; a CPU-starved Redis on a busy machine
    # must not turn into 503s (failing closed is tested elsewhere).
    settings_data["redis"] = {"timeout": "3s"}
    # ... nor a CPU-starved backend into 504s (the backend's timeout is tested elsewhere)
    settings_data["upstreams"]["shop"]["timeout"] = 10.0  # type: ignore[index]
    settings_data["campaigns"][0].update({"stock": STOCK, "per_user_limit": 2, "max_quantity": 2})  # type: ignore[index]


@pytest.mark.usefixtures("crowd_sale")
async def test_five_thousand_concurrent_purchases(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    rng = random.Random(2024)
    url = str(gateway.edge.make_url("/seckill/phone-1111"))
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    start = asyncio.Event()
    waiting = 0

    async def attempt(session: aiohttp.ClientSession, i: int) -> tuple[int, str, int, str | None]:
        nonlocal waiting
        user = f"user-{i % USERS}"
        quantity = rng.choice([1, 1, 1, 2])
        headers = {"X-User-Id": user}
        if i % 5 == 0:  # some buyers send keys (and some of those retry below)
            headers["Idempotency-Key"] = f"key-{i % USERS}"
            quantity = 1 + (i % USERS) % 2  # a retry asks what its key asked (else 422)
        waiting += 1
        await start.wait()
        async with session.post(url, json={"quantity": quantity}, headers=headers) as response:
            await response.read()
            return response.status, user, quantity, response.headers.get("X-Reservation-Id")

    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(attempt(session, i)) for i in range(REQUESTS)]
        await wait_for(lambda: waiting == REQUESTS)  # every buyer at the start line
        start.set()
        results = await asyncio.gather(*tasks)

    statuses = collections.Counter(status for status, *_ in results)
    assert set(statuses) <= {201, 403, 409}, statuses
    won_units: collections.Counter[str] = collections.Counter()
    winners = set()
    for status, user, quantity, rid in results:
        if status == 201:
            won_units[user] += quantity
            winners.add(rid)
    # replays of an idempotent purchase answer 201 again with the same reservation
    assert sum(won_units.values()) >= STOCK
    state = await check_invariant(redis, "phone-1111", per_user_limit=2)
    assert (state["sold"], state["available"], state["reserved"]) == (STOCK, 0, 0)
    # the backend saw exactly the winners, each once
    seen = shop.reservation_ids()
    assert len(seen) == len(set(seen)) == len(winners)
    assert set(seen) == winners
    assert sum(int(s.headers["X-Quantity"]) for s in shop.seen) == STOCK
    assert len({s.headers["X-User-Id"] for s in shop.seen}) <= USERS
