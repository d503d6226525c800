"""One hot item over several shards (``shards: K``): exactly the stock sold, the
per-user limit exact across shards, nobody told sold-out while units remain in any
shard, live adjustments spread over the shards, and every shard's books balance."""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.config import ConfigError
from gateway.core.reload import restart_only
from gateway.operations.reconcile import reconcile
from limiter.keys import shard_of, shard_tags
from tests.helpers import AUTH, Gateway, OpenGateway, check_invariant, settings_for, wait_for

pytestmark = [pytest.mark.integration]

CAMPAIGN = "phone-1111"


@pytest.fixture
def sharded(settings_data: dict[str, Any]) -> None:
    settings_data["redis"] = {"timeout": "3s"}  # a CPU-starved Redis must not mean 503s here
    settings_data["upstreams"]["shop"]["timeout"] = 10.0
    settings_data["campaigns"][0].update(
        {"stock": 300, "per_user_limit": 2, "max_quantity": 2, "shards": 4}
    )


async def books(redis: Redis, shards: int = 4, per_user_limit: int = 2) -> list[dict[str, int]]:
    """Every shard's counters, each shard's books checked (records, quotas, limit)."""
    return [
        await check_invariant(redis, tag, per_user_limit) for tag in shard_tags(CAMPAIGN, shards)
    ]


async def counted(redis: Redis, counter: str, shards: int = 4) -> int:
    """One counter summed over the shards, read while things move (no books checked)."""
    tags = shard_tags(CAMPAIGN, shards)
    return sum([int(await redis.hget(f"fg:{{{tag}}}:state", counter) or 0) for tag in tags])


def totals(shards: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(s.get(k, 0) for s in shards) for k in ("available", "reserved", "sold")} | {
        "stock_total": sum(s["stock_total"] for s in shards)
    }


async def crowd(
    gateway: Gateway, requests: int, users: int, seed: int = 7
) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    url = str(gateway.edge.make_url(f"/seckill/{CAMPAIGN}"))
    connector = aiohttp.TCPConnector(limit=0)

    async def attempt(session: aiohttp.ClientSession, i: int) -> tuple[Any, ...]:
        user = f"user-{i % users}"
        quantity = rng.choice([1, 1, 2])
        headers = {"X-User-Id": user, "Idempotency-Key": f"k-{i}"}
        async with session.post(url, json={"quantity": quantity}, headers=headers) as response:
            document = await response.json(content_type=None)
            return response.status, user, quantity, document

    async with aiohttp.ClientSession(connector=connector) as session:
        return await asyncio.gather(*(attempt(session, i) for i in range(requests)))


@pytest.mark.slow
@pytest.mark.usefixtures("sharded")
async def test_four_shards_sell_exactly_the_stock_to_a_crowd(
    gateway: Gateway, shop: Any, redis: Redis
) -> None:
    results = await crowd(gateway, 5000, 2000)
    statuses = collections.Counter(status for status, *_ in results)
    assert set(statuses) <= {201, 403, 409}, statuses
    shards = await books(redis)
    assert totals(shards) == {"available": 0, "reserved": 0, "sold": 300, "stock_total": 300}
    assert len(shop.seen) == len(set(shop.reservation_ids()))
    assert sum(int(s.headers["X-Quantity"]) for s in shop.seen) == 300
    # every shard sold some: the crowd was spread over them
    assert all(s["sold"] > 0 for s in shards), shards
    # buyers were told sold-out, and no unit is left anywhere: none was refused while
    # units remained in some shard for good
    assert any(doc.get("code") == "sold-out" for *_, doc in results)


@pytest.mark.usefixtures("sharded")
async def test_a_user_sending_a_hundred_attempts_at_once_holds_the_limit(
    gateway: Gateway, redis: Redis
) -> None:
    answers = await asyncio.gather(*(gateway.buy("greedy", key=f"g-{i}") for i in range(100)))
    won = sum(1 for a in answers if a.status == 201)
    assert won == 2
    shards = await books(redis)
    assert totals(shards)["reserved"] + totals(shards)["sold"] == 2


@pytest.mark.usefixtures("sharded")
async def test_an_emptied_shard_still_sells_what_the_others_have(
    gateway: Gateway, redis: Redis
) -> None:
    """One shard taken to zero by hand: its users win with units pulled from the others,
    until the last unit; then sold-out, and nothing is left anywhere."""
    first = gateway.runtime.snapshot.campaigns[CAMPAIGN].shards[0]
    available = (await first.store.figures()).available
    await first.store.adjust(delta=-available, actor="test")
    won = 0
    for i in range(400):
        answer = await gateway.buy(f"buyer-{i}", key=f"e-{i}")
        if answer.status == 201:
            won += 1
        else:
            assert answer.status == 409
            assert (await answer.json())["code"] == "sold-out"
            break
    assert won == 300 - available
    assert totals(await books(redis))["available"] == 0


@pytest.mark.usefixtures("sharded")
async def test_live_adjustments_spread_over_the_shards_and_never_go_below_zero(
    gateway: Gateway, redis: Redis
) -> None:
    buying = asyncio.ensure_future(
        asyncio.gather(*(gateway.buy(f"u-{i}", key=f"a-{i}") for i in range(120)))
    )
    up = await gateway.admin.post(f"/campaigns/{CAMPAIGN}/stock", json={"delta": 40}, headers=AUTH)
    assert up.status == 200
    down = await gateway.admin.post(
        f"/campaigns/{CAMPAIGN}/stock", json={"delta": -30}, headers=AUTH
    )
    assert down.status == 200
    await buying
    too_much = await gateway.admin.post(
        f"/campaigns/{CAMPAIGN}/stock", json={"delta": -10_000}, headers=AUTH
    )
    assert too_much.status == 409
    document = await gateway.campaign()
    shards = await books(redis)
    assert document["stock_total"] == totals(shards)["stock_total"] == 310
    assert [s["shard"] for s in document["shards"]] == [0, 1, 2, 3]
    assert all(s["balanced"] for s in document["shards"])
    assert sum(s["available"] for s in document["shards"]) == document["available"]
    zero = await gateway.admin.post(f"/campaigns/{CAMPAIGN}/stock", json={"set": 0}, headers=AUTH)
    assert zero.status == 200
    assert totals(await books(redis))["available"] == 0


def test_a_reload_may_not_change_a_running_campaigns_shards(
    settings_data: dict[str, Any],
) -> None:
    old = settings_for(settings_data)
    settings_data["campaigns"][0]["shards"] = 8
    new = settings_for(settings_data)
    problems = restart_only(old, new)
    assert [path for path, _ in problems] == ["campaigns[0].shards"]
    assert "runs on 1 shard(s)" in problems[0][1]


@pytest.mark.parametrize("shards", [0, 65, "four"])
def test_shards_out_of_range_are_refused_with_the_field_path(
    settings_data: dict[str, Any], shards: object
) -> None:
    settings_data["campaigns"][0]["shards"] = shards
    with pytest.raises(ConfigError, match=r"campaigns\[0\]\.shards"):
        settings_for(settings_data)


@pytest.mark.usefixtures("sharded")
async def test_holds_expire_in_every_shard_and_a_cancel_finds_its_shard(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    """Each shard keeps its own deadlines: the sweeper sweeps every one of them."""
    settings_data["campaigns"][0].update({"on_success": "hold", "hold_seconds": "1s"})
    async with new_gateway() as gateway:
        answers = [await gateway.buy(f"holder-{i}", key=f"h-{i}") for i in range(40)]
        assert {a.status for a in answers} == {201}
        rids = [a.headers["X-Reservation-Id"] for a in answers]
        assert {shard_of(rid) for rid in rids} == {0, 1, 2, 3}  # every shard holds some
        cancelled = await gateway.admin.post(f"/reservations/{rids[0]}/cancel", headers=AUTH)
        assert (await cancelled.json())["state"] == "cancelled"

        async def all_back() -> bool:
            return (await counted(redis, "reserved")) == 0

        await wait_for(all_back, within=15)
        shards = await books(redis)
        assert totals(shards) == {"available": 300, "reserved": 0, "sold": 0, "stock_total": 300}
        states = {(await gateway.admin.get(f"/reservations/{r}", headers=AUTH)) for r in rids[1:5]}
        for shown in states:
            assert (await shown.json())["state"] == "expired"


@pytest.mark.usefixtures("sharded")
async def test_queued_orders_of_every_shard_are_delivered(
    settings_data: dict[str, Any], new_gateway: OpenGateway, shop: Any, redis: Redis
) -> None:
    settings_data["campaigns"][0]["forward"] = "queue"
    async with new_gateway() as gateway:
        answers = [await gateway.buy(f"queued-{i}", key=f"q-{i}") for i in range(40)]
        assert {a.status for a in answers} == {202}

        async def delivered() -> bool:
            return (await counted(redis, "sold")) == 40

        await wait_for(delivered, within=15)
    assert sorted(shop.reservation_ids()) == sorted(a.headers["X-Reservation-Id"] for a in answers)


@pytest.mark.usefixtures("sharded")
async def test_reconcile_audits_every_shard_and_the_total(
    gateway: Gateway, redis_server: Any
) -> None:
    for i in range(20):
        assert (await gateway.buy(f"r-{i}", key=f"r-{i}")).status == 201
    settings = gateway.runtime.snapshot.settings
    books_found = await reconcile(
        settings, redis_server.url, only=CAMPAIGN, repair=False, progress=False
    )
    names = [a.campaign_id for a in books_found.campaigns]
    assert names == [f"{CAMPAIGN}[{j}]" for j in range(4)] + [f"{CAMPAIGN} (total)"]
    total = books_found.campaigns[-1]
    assert total.counters.sold == 20
    assert total.counters.stock_total == 300
    assert not books_found.drift
