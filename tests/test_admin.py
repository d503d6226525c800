"""The admin API: campaigns, live stock changes, reservations."""

from __future__ import annotations

import asyncio
import random

import pytest
from redis.asyncio import Redis

from tests.helpers import AUTH, Gateway, Shop, check_invariant, ledger, problem_of

pytestmark = pytest.mark.integration


async def test_health_needs_no_token_on_either_port(gateway: Gateway) -> None:
    for client in (gateway.edge, gateway.admin):
        for path in ("/healthz", "/readyz"):
            response = await client.get(path)
            assert response.status == 200, path


async def test_list_and_show_campaigns(gateway: Gateway) -> None:
    listing = await gateway.admin.get("/campaigns", headers=AUTH)
    assert listing.status == 200
    (campaign,) = (await listing.json())["campaigns"]
    assert campaign["id"] == "phone-1111"
    shown = await gateway.campaign()
    for field in ("id", "stock_total", "available", "reserved", "sold", "sold_out"):
        assert field in shown
    assert (shown["stock_total"], shown["available"], shown["reserved"], shown["sold"]) == (
        10,
        10,
        0,
        0,
    )
    assert shown["sold_out"] is False


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_bearer_scheme_is_case_insensitive(gateway: Gateway, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} test-admin-token"}
    assert (await gateway.admin.get("/campaigns", headers=headers)).status == 200


async def test_stock_delta_and_set(gateway: Gateway, redis: Redis) -> None:
    assert (await gateway.buy("alice")).status == 201
    up = await gateway.admin.post("/campaigns/phone-1111/stock", headers=AUTH, json={"delta": 5})
    assert up.status == 200
    assert ((await up.json())["stock_total"], (await up.json())["available"]) == (15, 14)
    down = await gateway.admin.post("/campaigns/phone-1111/stock", headers=AUTH, json={"delta": -4})
    assert ((await down.json())["stock_total"], (await down.json())["available"]) == (11, 10)
    # set moves available to n and stock_total by the same difference
    set_to = await gateway.admin.post("/campaigns/phone-1111/stock", headers=AUTH, json={"set": 3})
    document = await set_to.json()
    assert (document["stock_total"], document["available"], document["sold"]) == (4, 3, 1)
    refused = await gateway.admin.post(
        "/campaigns/phone-1111/stock", headers=AUTH, json={"delta": -4}
    )
    assert refused.status == 409
    assert (await problem_of(refused))["available"] == 3
    await check_invariant(redis, "phone-1111", per_user_limit=1)
    adjustments = [e for e in await ledger(redis, "phone-1111") if e["op"] == "adjust"]
    assert [a["qty"] for a in adjustments] == ["5", "-4", "-7"]
    assert (adjustments[0]["before"], adjustments[0]["after"]) == ("9/0/1/10", "14/0/1/15")
    assert adjustments[0]["by"].startswith("admin:")


async def test_set_zero_stops_the_sale_and_an_increase_restarts_it(gateway: Gateway) -> None:
    await gateway.admin.post("/campaigns/phone-1111/stock", headers=AUTH, json={"set": 0})
    assert (await gateway.buy("alice")).status == 409
    await gateway.admin.post("/campaigns/phone-1111/stock", headers=AUTH, json={"delta": 1})
    assert (await gateway.buy("alice")).status == 201


async def test_actor_is_recorded(gateway: Gateway, redis: Redis) -> None:
    await gateway.admin.post(
        "/campaigns/phone-1111/stock", headers={**AUTH, "X-Actor": "ops-jane"}, json={"delta": 1}
    )
    assert (await ledger(redis, "phone-1111"))[-1]["by"] == "admin:ops-jane"


async def test_reservation_lookup_and_idempotent_cancel(gateway: Gateway, redis: Redis) -> None:
    bought = await gateway.buy("alice")
    rid = bought.headers["X-Reservation-Id"]
    shown = await gateway.admin.get(f"/reservations/{rid}", headers=AUTH)
    document = await shown.json()
    assert (document["id"], document["user"], document["quantity"], document["state"]) == (
        rid,
        "alice",
        1,
        "committed",
    )
    assert (await gateway.buy("alice")).status == 403  # at the limit

    first = await gateway.admin.post(f"/reservations/{rid}/cancel", headers=AUTH)
    assert first.status == 200
    assert ((await first.json())["state"], (await first.json())["released_now"]) == (
        "cancelled",
        True,
    )
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["sold"]) == (10, 0)

    second = await gateway.admin.post(f"/reservations/{rid}/cancel", headers=AUTH)
    assert second.status == 200
    assert ((await second.json())["state"], (await second.json())["released_now"]) == (
        "cancelled",
        False,
    )
    assert (await check_invariant(redis, "phone-1111", per_user_limit=1))["available"] == 10

    # the quota came back: alice may buy again
    assert (await gateway.buy("alice")).status == 201


async def test_concurrent_cancels_release_once(gateway: Gateway, redis: Redis) -> None:
    rid = (await gateway.buy("alice")).headers["X-Reservation-Id"]
    responses = await asyncio.gather(
        *(gateway.admin.post(f"/reservations/{rid}/cancel", headers=AUTH) for _ in range(20))
    )
    released = [(await r.json())["released_now"] for r in responses]
    assert released.count(True) == 1
    assert (await check_invariant(redis, "phone-1111", per_user_limit=1))["available"] == 10


@pytest.fixture
def big_sale(settings_data: dict[str, object]) -> None:
    settings_data["campaigns"][0]["stock"] = 200  # type: ignore[index]


@pytest.mark.usefixtures("big_sale")
async def test_stock_adjustments_during_buying(gateway: Gateway, shop: Shop, redis: Redis) -> None:
    """Buyers and operators race; every change is atomic and the books balance."""
    rng = random.Random(7)
    deltas = [rng.choice([-7, -3, 2, 5, 11]) for _ in range(60)]

    async def operator() -> list[int]:
        applied = []
        for delta in deltas:
            response = await gateway.admin.post(
                "/campaigns/phone-1111/stock", headers=AUTH, json={"delta": delta}
            )
            assert response.status in (200, 409)
            if response.status == 200:
                applied.append(delta)
            await asyncio.sleep(0)  # one loop turn (the scenario): buyers and operator interleave
        return applied

    operating = asyncio.create_task(operator())
    responses = await asyncio.gather(*(gateway.buy(f"buyer-{i}") for i in range(600)))
    applied = await operating
    winners = [r for r in responses if r.status == 201]
    assert all(r.status in (201, 409) for r in responses)
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert state["stock_total"] == 200 + sum(applied)
    assert state["sold"] == len(winners) == len(shop.seen)
    assert state["reserved"] == 0
