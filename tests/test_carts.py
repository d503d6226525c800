"""Carts: one order of several items, each from its own campaign (its own slot), all
or nothing. Every item is reserved or none is; the backend gets one order; its answer,
confirm, cancel and the hold's end act on every item; an order its gateway left in
the middle is rolled back by a sweeper; and every campaign's books balance."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from redis.asyncio import Redis

from gateway.core.carts import CartSweep
from gateway.operations.reconcile import Books, reconcile, render_books
from limiter.carts import CartItem, CartState, OpenStatus
from limiter.keys import new_reservation_id
from limiter.records import Attempt, ReserveStatus, State
from tests.helpers import (
    AUTH,
    Gateway,
    OpenGateway,
    Shop,
    check_invariant,
    order_ids,
    problem_of,
    wait_for,
)

pytestmark = [pytest.mark.integration]

PHONE, CASE = "phone-1111", "case-1111"
BUNDLE = "/seckill/bundle"


@pytest.fixture(autouse=True)
def cart_settings(settings_data: dict[str, Any]) -> None:
    settings_data["redis"] = {"timeout": "100ms"}  # a stuck order is rolled back in 2 s
    settings_data["campaigns"].append(
        {
            "id": CASE,
            "route": f"POST /seckill/{CASE}",
            "upstream": "shop",
            "stock": 20,
            "per_user_limit": 2,
            "max_quantity": 2,
        }
    )
    settings_data["campaigns"].append(  # a campaign the cart does not sell
        {"id": "cover-1111", "route": "POST /seckill/cover-1111", "upstream": "shop", "stock": 5}
    )
    settings_data["carts"] = [
        {"id": "bundle", "route": f"POST {BUNDLE}", "upstream": "shop", "campaigns": [PHONE, CASE]}
    ]


def items(phone: int = 1, case: int = 2) -> dict[str, Any]:
    lines = []
    if phone:
        lines.append({"campaign": PHONE, "quantity": phone})
    if case:
        lines.append({"campaign": CASE, "quantity": case})
    return {"items": lines}


async def buy_cart(
    gateway: Gateway, user: str = "alice", body: Any = None, key: str | None = None
) -> ClientResponse:
    headers = {"X-User-Id": user}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await gateway.edge.post(BUNDLE, json=items() if body is None else body, headers=headers)


async def books(redis: Redis) -> dict[str, dict[str, int]]:
    return {
        PHONE: await check_invariant(redis, PHONE, 1),
        CASE: await check_invariant(redis, CASE, 2),
    }


def held(figures: dict[str, int]) -> int:
    return figures["reserved"] + figures["sold"]


async def order_of(gateway: Gateway, order_id: str) -> dict[str, Any]:
    response = await gateway.admin.get(f"/reservations/{order_id}", headers=AUTH)
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def test_a_cart_is_one_order_of_every_item(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    response = await buy_cart(gateway)
    assert response.status == 201, await response.text()
    order_id = response.headers["X-Reservation-Id"]
    assert order_id.startswith("bundle.")
    (seen,) = shop.seen
    assert seen.headers["X-Reservation-Id"] == order_id
    assert seen.headers["X-Campaign-Id"] == f"{PHONE},{CASE}"
    assert seen.headers["X-Cart-Id"] == "bundle"
    parts = dict(part.split("=", 1) for part in seen.headers["X-Reservation-Items"].split(","))
    assert set(parts) == {PHONE, CASE}
    assert parts[PHONE].endswith(":1")
    assert parts[CASE].endswith(":2")
    assert json.loads(seen.body) == items()
    assert response.headers["X-Reservation-Items"] == seen.headers["X-Reservation-Items"]
    ledger = await books(redis)
    assert ledger[PHONE]["sold"] == 1
    assert ledger[CASE]["sold"] == 2
    document = await order_of(gateway, order_id)
    assert document["state"] == "committed"
    assert document["settled"] is True
    assert [i["state"] for i in document["items"]] == ["committed", "committed"]
    # the buyer polls their order on the gateway port, and only they can
    mine = await gateway.edge.get(f"/reservations/{order_id}", headers={"X-User-Id": "alice"})
    assert (await mine.json())["state"] == "committed"
    theirs = await gateway.edge.get(f"/reservations/{order_id}", headers={"X-User-Id": "bob"})
    assert theirs.status == 404


async def test_an_item_sold_out_refuses_the_order_and_takes_nothing(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    case = gateway.runtime.snapshot.campaigns[CASE]
    await case.store.adjust(set_to=1, actor="test")  # one left, two asked
    response = await buy_cart(gateway)
    problem = await problem_of(response)
    assert response.status == 409
    assert problem["code"] == "insufficient-stock"
    assert problem["campaign"] == CASE
    assert problem["available"] == 1
    assert problem["items"] == [
        {"campaign": PHONE, "quantity": 1, "code": "ok"},
        {"campaign": CASE, "quantity": 2, "code": "insufficient-stock", "available": 1},
    ]
    await case.store.adjust(set_to=0, actor="test")
    problem = await problem_of(await buy_cart(gateway, "bob"))
    assert problem["code"] == "sold-out"
    assert problem["campaign"] == CASE
    assert shop.seen == []
    ledger = await books(redis)
    assert held(ledger[PHONE]) == 0
    assert ledger[PHONE]["available"] == 10


async def test_the_limit_of_each_campaign_holds_in_a_cart(gateway: Gateway, redis: Redis) -> None:
    assert (await buy_cart(gateway, body=items(phone=0, case=2))).status == 201
    problem = await problem_of(await buy_cart(gateway, body=items(phone=1, case=1)))
    assert problem["code"] == "limit-exceeded"
    assert problem["campaign"] == CASE
    assert problem["limit"] == 2
    assert problem["held"] == 2
    ledger = await books(redis)
    assert held(ledger[PHONE]) == 0
    assert held(ledger[CASE]) == 2


@pytest.mark.parametrize(("status", "code"), [(409, "upstream-refused"), (503, "upstream-failed")])
async def test_a_backend_refusal_gives_every_item_back(
    gateway: Gateway, shop: Shop, redis: Redis, status: int, code: str
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"why": "no"}, status=status)

    shop.respond = refuse
    response = await buy_cart(gateway)
    assert response.status == (status if status < 500 else 502)
    order_id = response.headers["X-Reservation-Id"]
    document = await order_of(gateway, order_id)
    assert document["state"] == "released"
    assert [i["state"] for i in document["items"]] == ["released", "released"]
    ledger = await books(redis)
    assert held(ledger[PHONE]) == held(ledger[CASE]) == 0


async def test_a_retry_with_its_key_replays_and_another_request_is_refused(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    first = await buy_cart(gateway, key="k1")
    again = await buy_cart(gateway, key="k1")
    assert first.status == again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["X-Reservation-Id"] == first.headers["X-Reservation-Id"]
    other = await buy_cart(gateway, key="k1", body=items(phone=1, case=1))
    assert (await problem_of(other))["code"] == "idempotency-key-mismatch"
    assert len(shop.seen) == 1
    ledger = await books(redis)
    assert ledger[PHONE]["sold"] == 1
    assert ledger[CASE]["sold"] == 2


BAD_CARTS = [
    ({"items": []}, "items"),
    ({}, "items"),
    ({"items": "phone"}, "items"),
    ({"items": [*items()["items"], {"campaign": PHONE}]}, "items"),  # more than max_items
    ({"items": [{"campaign": PHONE}, {"campaign": PHONE}]}, "items[1].campaign"),
    ({"items": [{"campaign": "nope", "quantity": 1}]}, "items[0].campaign"),
    ({"items": [{"campaign": "cover-1111", "quantity": 1}]}, "items[0].campaign"),
    ({"items": [{"quantity": 1}]}, "items[0].campaign"),
    ({"items": [5]}, "items[0]"),
    ({"items": [{"campaign": CASE, "quantity": 3}]}, "items[0].quantity"),
    ({"items": [{"campaign": CASE, "quantity": 0}]}, "items[0].quantity"),
    ({"items": [{"campaign": CASE, "quantity": "2"}]}, "items[0].quantity"),
    ({"items": [{"campaign": CASE, "quantity": True}]}, "items[0].quantity"),
    ({"items": [{"campaign": PHONE, "quantity": 1}, {"campaign": 7}]}, "items[1].campaign"),
]


async def test_bad_carts_are_400_with_the_items_path_and_change_nothing(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    for body, path in BAD_CARTS:
        response = await buy_cart(gateway, body=body)
        problem = await problem_of(response)
        assert response.status == 400, (body, problem)
        assert (problem["code"], problem["path"]) == ("bad-request", path), body
    not_json = await gateway.edge.post(BUNDLE, data=b"{", headers={"X-User-Id": "alice"})
    assert not_json.status == 400
    assert shop.seen == []
    ledger = await books(redis)
    assert held(ledger[PHONE]) == held(ledger[CASE]) == 0
    assert await redis.zcard("fg:{bundle}:rids") == 0


async def test_an_order_left_in_the_middle_is_rolled_back_at_its_deadline(
    gateway: Gateway, redis: Redis
) -> None:
    """A gateway that opened an order and reserved one item, then died: the sweeper
    gives the item back and leaves a tombstone for the other, so that its reserve,
    should it arrive late, cannot make it."""
    cart = gateway.runtime.snapshot.carts["bundle"]
    phone, case = (gateway.runtime.snapshot.campaigns[c] for c in (PHONE, CASE))
    order_id = new_reservation_id("bundle")
    lines = [
        CartItem(PHONE, new_reservation_id(PHONE), 1),
        CartItem(CASE, new_reservation_id(CASE), 2),
    ]
    opened = await cart.store.open(
        order_id, "mallory", lines, b"", idempotency_field="", fingerprint="", actor="test"
    )
    assert opened == (OpenStatus.OPENED, order_id)
    cart_store = phone.store.for_carts()
    (decision,) = await cart_store.reserve(
        [Attempt(lines[0].reservation_id, "mallory", 1, "", order_id.encode())]
    )
    assert decision.status is ReserveStatus.RESERVED
    assert held((await books(redis))[PHONE]) == 1

    async def rolled_back() -> bool:
        order = await cart.store.reservation(order_id)
        return order is not None and order.state is CartState.RELEASED and order.applied

    await wait_for(rolled_back, within=10)
    ledger = await books(redis)
    assert held(ledger[PHONE]) == 0
    # the late reserve of the other item finds its tombstone
    (late,) = await case.store.for_carts().reserve(
        [Attempt(lines[1].reservation_id, "mallory", 2, "", order_id.encode())]
    )
    assert late.status is ReserveStatus.DUPLICATE
    assert held((await books(redis))[CASE]) == 0
    assert await CartSweep(cart).sweep("test") == 0  # nothing left to do


async def test_a_crowd_never_gets_one_item_without_the_other(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    """2,000 buyers of a two-item cart; the cases (12, two per order) run out first."""
    await gateway.runtime.snapshot.campaigns[CASE].store.adjust(set_to=12, actor="test")
    results = await asyncio.gather(*(buy_cart(gateway, f"user-{i}") for i in range(2000)))
    statuses = collections.Counter(r.status for r in results)
    assert statuses[201] == 6, statuses
    assert set(statuses) <= {201, 409}, statuses
    ledger = await books(redis)
    assert ledger[CASE]["sold"] == 12
    assert ledger[PHONE]["sold"] == 6
    assert ledger[PHONE]["available"] == 4
    assert held(ledger[PHONE]) == 6
    assert len(shop.seen) == 6
    for seen in shop.seen:
        parts = seen.headers["X-Reservation-Items"].split(",")
        assert [p.split("=")[0] for p in parts] == [PHONE, CASE]
    # every order settled whole: none stuck, none with one item
    for order_id in await order_ids(redis):
        document = await order_of(gateway, order_id)
        assert document["settled"], document
        states = {i["state"] for i in document["items"]}
        if document["state"] == "committed":
            assert states == {"committed"}, document
        else:
            assert document["state"] == "released", document
            assert states <= {"released", None}, document


@pytest.fixture
def hold(settings_data: dict[str, Any]) -> None:
    settings_data["carts"][0].update({"on_success": "hold", "hold_seconds": "1s"})


async def item_states(gateway: Gateway, order_id: str) -> list[str]:
    return [i["state"] for i in (await order_of(gateway, order_id))["items"]]


@pytest.mark.usefixtures("hold")
async def test_a_held_order_is_confirmed_whole_or_expires_whole(
    gateway: Gateway, redis: Redis
) -> None:
    paid = (await buy_cart(gateway, "alice")).headers["X-Reservation-Id"]
    unpaid = (await buy_cart(gateway, "bob")).headers["X-Reservation-Id"]
    assert (await order_of(gateway, paid))["state"] == "held"
    assert await item_states(gateway, paid) == ["held", "held"]
    confirmed = await gateway.admin.post(f"/reservations/{paid}/confirm", headers=AUTH)
    assert confirmed.status == 200, await confirmed.text()
    assert (await confirmed.json())["confirmed_now"] is True
    assert await item_states(gateway, paid) == ["committed", "committed"]

    async def expired() -> bool:
        return bool((await order_of(gateway, unpaid))["state"] == "expired")

    await wait_for(expired, within=10)
    await wait_for(lambda: item_states_are(gateway, unpaid, "expired"), within=10)
    late = await gateway.admin.post(f"/reservations/{unpaid}/confirm", headers=AUTH)
    assert (await problem_of(late))["code"] == "expired"
    ledger = await books(redis)
    assert ledger[PHONE]["sold"] == 1
    assert ledger[CASE]["sold"] == 2
    assert ledger[PHONE]["reserved"] == ledger[CASE]["reserved"] == 0


async def item_states_are(gateway: Gateway, order_id: str, state: str) -> bool:
    return set(await item_states(gateway, order_id)) == {state}


async def test_cancel_acts_on_the_whole_order_also_through_an_item(
    gateway: Gateway, redis: Redis
) -> None:
    first = (await buy_cart(gateway, "alice")).headers["X-Reservation-Id"]
    second = (await buy_cart(gateway, "bob")).headers["X-Reservation-Id"]
    cancelled = await gateway.admin.post(f"/reservations/{first}/cancel", headers=AUTH)
    assert cancelled.status == 200, await cancelled.text()
    assert (await cancelled.json())["released_now"] is True
    assert await item_states(gateway, first) == ["cancelled", "cancelled"]
    # an item of the second order names it: the whole order is cancelled
    item = (await order_of(gateway, second))["items"][1]["reservation_id"]
    shown = await gateway.admin.get(f"/reservations/{item}", headers=AUTH)
    assert (await shown.json())["cart_order"] == second
    through = await gateway.admin.post(f"/reservations/{item}/cancel", headers=AUTH)
    assert through.status == 200
    assert await item_states(gateway, second) == ["cancelled", "cancelled"]
    again = await gateway.admin.post(f"/reservations/{first}/cancel", headers=AUTH)
    assert (await again.json())["released_now"] is False
    ledger = await books(redis)
    assert held(ledger[PHONE]) == held(ledger[CASE]) == 0
    # the users' keys and quotas are free again: they can buy anew
    assert (await buy_cart(gateway, "alice")).status == 201


async def test_a_queued_cart_is_delivered_once_as_one_order(
    shop: Shop, redis: Redis, settings_data: dict[str, Any], new_gateway: OpenGateway
) -> None:
    settings_data["carts"][0]["forward"] = "queue"
    async with new_gateway() as queued:
        response = await buy_cart(queued, key="q1")
        assert response.status == 202, await response.text()
        order_id = response.headers["X-Reservation-Id"]
        document = await response.json()
        assert document["status_url"] == f"/reservations/{order_id}"

        async def committed() -> bool:
            return bool((await order_of(queued, order_id))["state"] == "committed")

        await wait_for(committed, within=10)
        await wait_for(lambda: item_states_are(queued, order_id, "committed"), within=10)
        replay = await buy_cart(queued, key="q1")
        assert replay.status == 202
        assert replay.headers["Idempotent-Replayed"] == "true"
    assert shop.reservation_ids() == [order_id]
    ledger = await books(redis)
    assert ledger[PHONE]["sold"] == 1
    assert ledger[CASE]["sold"] == 2


async def test_reconcile_finds_an_order_that_is_not_whole_and_repairs_it(
    gateway: Gateway, redis: Redis, redis_server: Any
) -> None:
    settings = gateway.runtime.snapshot.settings

    async def books_now(only: str | None = None, repair: bool = False) -> Books:
        return await reconcile(settings, redis_server.url, only=only, repair=repair, progress=False)

    kept = (await buy_cart(gateway, "alice")).headers["X-Reservation-Id"]
    broken = (await buy_cart(gateway, "bob")).headers["X-Reservation-Id"]
    found = await books_now()
    (cart,) = found.carts
    assert not found.drift
    assert cart.orders == {"committed": 2}
    assert cart.units == {PHONE: {"committed": 2}, CASE: {"committed": 4}}
    # an order marked cancelled and settled by hand while its items stayed sold
    token = broken.rsplit(".", 1)[1]
    await redis.hset(f"fg:{{bundle}}:r:{token}", mapping={"state": "cancelled", "applied": 1})
    found = await books_now("bundle")
    assert found.campaigns == []
    (cart,) = found.carts
    assert [(o, s, i) for o, _, s, i in cart.broken] == [(broken, "cancelled", "committed")] * 2
    assert "not whole" in render_books(found, "flashgate.yaml")
    found = await books_now("bundle", repair=True)
    assert found.carts[0].repaired == 1
    assert not (await books_now()).drift
    assert await item_states(gateway, broken) == ["cancelled", "cancelled"]
    ledger = await books(redis)
    assert (ledger[PHONE]["sold"], ledger[CASE]["sold"]) == (1, 2)
    # an item given back outside a committed order is not taken again by a repair
    item = (await order_of(gateway, kept))["items"][0]["reservation_id"]
    phone = gateway.runtime.snapshot.campaigns[PHONE]
    await phone.store.release(
        item, leavable=(State.COMMITTED,), target=State.CANCELLED, reason="by hand", actor="test"
    )
    found = await books_now("bundle", repair=True)
    assert found.carts[0].unrepaired == [kept]
    assert found.repair_refused
    assert "NOT repaired" in render_books(found, "flashgate.yaml")


def test_the_openapi_document_describes_the_cart(settings_data: dict[str, Any]) -> None:
    from gateway.contract.openapi import document
    from tests.helpers import settings_for

    doc = document(settings_for(settings_data))
    operation = doc["paths"][BUNDLE]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    line = body["properties"]["items"]["items"]
    assert line["properties"]["campaign"]["enum"] == [PHONE, CASE]
    assert body["properties"]["items"]["maxItems"] == 2
    poll = doc["paths"]["/reservations/{id}"]["x-gateway-port"]["get"]["responses"]["200"]
    shapes = poll["content"]["application/json"]["schema"]["oneOf"]
    assert {"$ref": "#/components/schemas/BuyerCartOrder"} in shapes
