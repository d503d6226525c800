"""Buying through the edge: winners reach the backend, failures give stock back."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.helpers import (
    Gateway,
    OpenGateway,
    Shop,
    accept,
    check_invariant,
    problem_of,
    wait_for,
)

pytestmark = pytest.mark.integration


async def test_winner_is_forwarded_with_reservation_headers(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    response = await gateway.buy(
        "alice",
        path="/seckill/phone-1111?ref=banner",
        data=b'{"quantity": 1, "address": "somewhere"}',
        headers={"Content-Type": "application/json", "X-Trace": "t-1", "X-Quantity": "99"},
    )
    assert response.status == 201
    rid = response.headers["X-Reservation-Id"]
    assert response.headers["X-Shop"] == "yes"
    assert await response.json() == {"order_id": f"order-{rid}"}

    (seen,) = shop.seen
    assert (seen.method, seen.path_qs) == ("POST", "/seckill/phone-1111?ref=banner")
    assert seen.body == b'{"quantity": 1, "address": "somewhere"}'
    assert seen.headers["X-Reservation-Id"] == rid
    assert seen.headers["X-Campaign-Id"] == "phone-1111"
    assert seen.headers["X-User-Id"] == "alice"
    assert seen.headers["X-Quantity"] == "1"  # the client's own X-Quantity is not believed
    assert seen.headers["X-Trace"] == "t-1"
    assert seen.headers["Content-Type"] == "application/json"

    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (9, 0, 1)
    record = await gateway.admin.get(
        f"/reservations/{rid}", headers={"Authorization": "Bearer test-admin-token"}
    )
    assert (await record.json())["state"] == "committed"


async def test_a_compressed_body_is_forwarded_as_read(gateway: Gateway, shop: Shop) -> None:
    # aiohttp decodes the body; its Content-Encoding no longer describes what is forwarded
    body = b'{"quantity": 1, "note": "gift"}'
    response = await gateway.buy(
        "alice", data=gzip.compress(body), headers={"Content-Encoding": "gzip"}
    )
    assert response.status == 201
    (seen,) = shop.seen
    assert seen.body == body
    assert "Content-Encoding" not in seen.headers


@pytest.fixture
def virtual_host_upstream(settings_data: dict[str, object], shop: Shop) -> None:
    headers = {"Host": "orders.shop.internal", "X-Forwarded-Proto": "https"}
    settings_data["upstreams"] = {"shop": {"url": shop.url, "timeout": 2.0, "headers": headers}}


@pytest.mark.usefixtures("virtual_host_upstream")
async def test_an_upstream_can_be_given_its_virtual_host_and_the_outer_scheme(
    gateway: Gateway, shop: Shop
) -> None:
    """Behind a TLS-terminating balancer the gateway sees http; the operator says https."""
    response = await gateway.buy(
        "alice", headers={"Host": "shop.example", "X-Forwarded-Proto": "x"}
    )
    assert response.status == 201
    (seen,) = shop.seen
    assert seen.headers["Host"] == "orders.shop.internal"
    assert seen.headers["X-Forwarded-Proto"] == "https"
    assert seen.headers["X-Forwarded-Host"] == "shop.example"  # the gateway's own


async def test_quantity_counts_units_against_the_limit(
    gateway: Gateway, settings_data: dict[str, object], redis: Redis
) -> None:
    # settings: per_user_limit 1, max_quantity 1 -> a second unit is over the limit
    assert (await gateway.buy("alice")).status == 201
    refused = await gateway.buy("alice")
    assert refused.status == 403
    problem = await problem_of(refused)
    assert problem["code"] == "limit-exceeded"
    assert (problem["limit"], problem["held"]) == (1, 1)
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.fixture
def quantity_above_the_limit(settings_data: dict[str, object]) -> None:
    campaign = settings_data["campaigns"][0]  # type: ignore[index]
    campaign.update({"per_user_limit": 1, "max_quantity": 2})


@pytest.mark.usefixtures("quantity_above_the_limit")
async def test_a_quantity_above_the_limit_is_refused_by_the_limit(
    gateway: Gateway, redis: Redis
) -> None:
    refused = await gateway.buy("alice", quantity=2)  # a valid quantity, over the limit
    assert (refused.status, (await problem_of(refused))["code"]) == (403, "limit-exceeded")
    too_many = await gateway.buy("alice", quantity=3)  # not a valid quantity at all
    assert (too_many.status, (await problem_of(too_many))["code"]) == (400, "bad-request")
    assert (await gateway.buy("alice", quantity=1)).status == 201
    await check_invariant(redis, "phone-1111", per_user_limit=1)


@pytest.fixture
def multi_unit(settings_data: dict[str, object]) -> None:
    campaign = settings_data["campaigns"][0]  # type: ignore[index]
    campaign.update({"stock": 5, "per_user_limit": 3, "max_quantity": 3})


@pytest.mark.usefixtures("multi_unit")
async def test_units_and_insufficient_stock(gateway: Gateway, shop: Shop, redis: Redis) -> None:
    assert (await gateway.buy("alice", quantity=2)).status == 201
    assert shop.seen[-1].headers["X-Quantity"] == "2"
    over = await gateway.buy("alice", quantity=2)  # holds 2, limit 3
    assert (over.status, (await problem_of(over))["code"]) == (403, "limit-exceeded")
    assert (await gateway.buy("bob", quantity=3)).status == 201  # 0 left
    assert (await gateway.buy("carol", quantity=1)).status == 409
    await check_invariant(redis, "phone-1111", per_user_limit=3)
    state = await gateway.campaign()
    assert (state["available"], state["sold"], state["sold_out"]) == (0, 5, True)


@pytest.mark.usefixtures("multi_unit")
async def test_insufficient_stock_is_not_sold_out(gateway: Gateway, redis: Redis) -> None:
    assert (await gateway.buy("alice", quantity=3)).status == 201
    assert (await gateway.buy("bob", quantity=1)).status == 201
    short = await gateway.buy("carol", quantity=2)  # 1 left
    problem = await problem_of(short)
    assert (short.status, problem["code"], problem["available"]) == (409, "insufficient-stock", 1)
    assert "phone-1111" not in gateway.runtime.watch.sold_out
    assert (await gateway.buy("carol", quantity=1)).status == 201
    await check_invariant(redis, "phone-1111", per_user_limit=3)


async def test_sold_out_problem(gateway: Gateway) -> None:
    for i in range(10):
        assert (await gateway.buy(f"user-{i}")).status == 201
    response = await gateway.buy("late")
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (409, "sold-out")


@pytest.fixture
def short_upstream_timeout(settings_data: dict[str, object], shop: Shop) -> None:
    settings_data["upstreams"] = {"shop": {"url": shop.url, "timeout": 0.3}}


@pytest.mark.usefixtures("short_upstream_timeout")
@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        ("500", 502, "upstream-failed"),
        ("503", 502, "upstream-failed"),
        ("timeout", 504, "upstream-timeout"),
        ("reset", 502, "upstream-failed"),
    ],
)
async def test_backend_failure_releases_the_reservation(
    gateway: Gateway, shop: Shop, redis: Redis, behaviour: str, status: int, code: str
) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        # the sleeps are the backend's failure (the scenario): far past the 0.3 s timeout,
        # or silent after the reset
        if behaviour == "timeout":
            await asyncio.sleep(5)
        if behaviour == "reset":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
        return web.Response(status=int(behaviour) if behaviour.isdigit() else 500)

    shop.respond = fail
    response = await gateway.buy("alice")
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (status, code)
    rid = problem["reservation_id"]
    assert response.headers["X-Reservation-Id"] == rid
    # released before the answer: stock and quota are back already
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (10, 0, 0)
    assert await redis.hget(f"fg:{{phone-1111}}:r:{rid.split('.')[1]}", "state") == b"released"
    # the quota came back: the same user may try again
    shop.respond = _accept_once
    assert (await gateway.buy("alice")).status == 200


async def test_a_buyer_who_finds_every_backend_connection_busy_is_released_unsent(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    settings_data["upstreams"] = {"shop": {"url": shop.url, "timeout": 1.2, "max_connections": 1}}

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)  # the backend's own slowness: it keeps the one connection busy
        return web.json_response({"ok": True}, status=201)

    shop.respond = slow
    async with new_gateway() as gw:
        first = asyncio.ensure_future(gw.buy("alice"))
        await wait_for(lambda: len(shop.seen) == 1)
        response = await gw.buy("bob")  # the one connection is busy for 1 s
        problem = await problem_of(response)
        assert (response.status, problem["code"]) == (504, "upstream-timeout")
        assert "the order was not sent" in problem["detail"]
        assert (await first).status == 201
    assert len(shop.seen) == 1  # bob's order never reached the backend
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (9, 0, 1)


async def _accept_once(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True}, status=200)


async def test_refused_connection_releases(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, object]
) -> None:
    from gateway.embedded.server import free_port

    settings_data["upstreams"] = {"shop": {"url": f"http://127.0.0.1:{free_port()}", "timeout": 1}}
    async with new_gateway() as gw:
        response = await gw.buy("alice")
        assert (response.status, (await problem_of(response))["code"]) == (502, "upstream-failed")
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["reserved"]) == (10, 0)


async def test_a_fault_of_the_gateway_while_forwarding_releases(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    # A backend pool closed under the request (as a reload retires one) is the
    # gateway's own fault: the buyer gets a 500, and the units are back first.
    await gateway.runtime.snapshot.upstreams["shop"].close()
    response = await gateway.buy("alice")
    assert (response.status, (await problem_of(response))["code"]) == (500, "internal")
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (10, 0, 0)
    assert shop.seen == []


async def test_backend_refusal_passes_through_and_releases(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": "address missing"}, status=422, headers={"X-Why": "address"}
        )

    shop.respond = refuse
    response = await gateway.buy("alice")
    assert response.status == 422
    assert await response.json() == {"error": "address missing"}
    assert response.headers["X-Why"] == "address"
    assert response.headers["Content-Type"].startswith("application/json")
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (10, 0, 0)


async def test_sequential_idempotent_retry_replays_the_stored_answer(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = await accept(request)
        response.headers.add("Link", "</orders/1>; rel=order")
        response.headers.add("Link", "</help>; rel=help")
        response.set_cookie("session", "backend-secret")
        return response

    shop.respond = answer
    first = await gateway.buy("alice", key="order-42")
    assert first.status == 201
    body = await first.read()
    assert "session=backend-secret" in first.headers["Set-Cookie"]
    again = await gateway.buy("alice", key="order-42")
    assert again.status == 201
    assert await again.read() == body
    assert again.headers["X-Reservation-Id"] == first.headers["X-Reservation-Id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    # the backend's headers come back as they were (its cookie is not kept in Redis)
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["X-Shop"] == "yes"
    assert again.headers.getall("Link") == first.headers.getall("Link")
    assert "Set-Cookie" not in again.headers
    assert len(shop.seen) == 1  # never forwarded twice
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert state["sold"] == 1


async def test_idempotency_key_is_scoped_to_the_user(gateway: Gateway, shop: Shop) -> None:
    a = await gateway.buy("alice", key="same")
    b = await gateway.buy("bob", key="same")
    assert (a.status, b.status) == (201, 201)
    assert a.headers["X-Reservation-Id"] != b.headers["X-Reservation-Id"]
    assert len(shop.seen) == 2


async def test_concurrent_idempotent_retries_deduct_once(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    gate = asyncio.Event()

    async def slow_accept(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"ok": True}, status=201)

    shop.respond = slow_accept
    tasks = [asyncio.create_task(gateway.buy("alice", key="k-1")) for _ in range(20)]
    await wait_for(lambda: len(shop.seen) == 1)
    # the 19 retries are answered (409 duplicate) while the first is still at the backend
    await wait_for(lambda: sum(task.done() for task in tasks) == 19)
    gate.set()
    responses = await asyncio.gather(*tasks)
    statuses = sorted(r.status for r in responses)
    assert statuses.count(201) == 1
    duplicates = [r for r in responses if r.status == 409]
    assert len(duplicates) == 19
    rid = next(r.headers["X-Reservation-Id"] for r in responses if r.status == 201)
    for response in duplicates:
        problem = await problem_of(response)
        assert (problem["code"], problem["reservation_id"], problem["state"]) == (
            "duplicate",
            rid,
            "reserved",
        )
    assert len(shop.seen) == 1
    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert (state["sold"], state["reserved"]) == (1, 0)
    # once settled, a retry replays the stored answer
    replay = await gateway.buy("alice", key="k-1")
    assert (replay.status, replay.headers["Idempotent-Replayed"]) == (201, "true")


async def test_key_is_free_again_after_a_release(gateway: Gateway, shop: Shop) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    shop.respond = fail
    assert (await gateway.buy("alice", key="k")).status == 502
    shop.respond = _accept_once
    fresh = await gateway.buy("alice", key="k")
    assert fresh.status == 200
    assert "Idempotent-Replayed" not in fresh.headers
    assert len(shop.seen) == 2


async def test_sold_out_flag_answers_without_redis(gateway: Gateway, redis: Redis) -> None:
    for i in range(10):
        assert (await gateway.buy(f"user-{i}")).status == 201
    assert (await gateway.buy("late")).status == 409
    assert "phone-1111" in gateway.runtime.watch.sold_out
    gateway.runtime.stop_background()  # heartbeats are scripts too: keep them out
    before = await _reserve_calls(redis)
    for i in range(200):
        response = await gateway.buy(f"crowd-{i}")
        assert response.status == 409
    assert await _reserve_calls(redis) == before


async def test_after_sell_out_a_keyed_retry_replays_and_a_new_key_is_sold_out_locally(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    """A winner's retry is owed its outcome; a key that names nothing (or a random one,
    sent to get past the flag) is sold-out. Neither runs a script in Redis."""
    first = await gateway.buy("user-0", key="k-0")
    for i in range(1, 10):
        assert (await gateway.buy(f"user-{i}")).status == 201
    assert (await gateway.buy("late")).status == 409
    assert "phone-1111" in gateway.runtime.watch.sold_out
    gateway.runtime.stop_background()  # heartbeats are scripts too: keep them out
    before = await _reserve_calls(redis)
    replay = await gateway.buy("user-0", key="k-0")
    assert (replay.status, replay.headers["Idempotent-Replayed"]) == (201, "true")
    assert replay.headers["X-Reservation-Id"] == first.headers["X-Reservation-Id"]
    for i in range(50):
        response = await gateway.buy(f"crowd-{i}", key=f"random-{i}")
        assert (response.status, (await problem_of(response))["code"]) == (409, "sold-out")
    bad = await gateway.buy("crowd-x", key="bad key \u00e9")
    assert (bad.status, (await problem_of(bad))["code"]) == (400, "bad-request")
    assert await _reserve_calls(redis) == before
    assert len(shop.seen) == 10
    await check_invariant(redis, "phone-1111", per_user_limit=1)


async def test_sold_out_flag_clears_within_a_second_of_a_release(
    gateway: Gateway, redis: Redis
) -> None:
    rids = []
    for i in range(10):
        response = await gateway.buy(f"user-{i}")
        rids.append(response.headers["X-Reservation-Id"])
    assert (await gateway.buy("late")).status == 409
    cancel = await gateway.admin.post(
        f"/reservations/{rids[0]}/cancel", headers={"Authorization": "Bearer test-admin-token"}
    )
    assert cancel.status == 200

    async def buyable() -> bool:
        return "phone-1111" not in gateway.runtime.watch.sold_out

    await wait_for(buyable, within=5.0)
    assert (await gateway.buy("late")).status == 201


async def test_stock_returned_by_another_process_clears_the_flag(
    gateway: Gateway, redis: Redis
) -> None:
    """A release made elsewhere (here: by hand through the script) is seen within a second."""
    for i in range(10):
        await gateway.buy(f"user-{i}")
    assert (await gateway.buy("late")).status == 409
    store = gateway.runtime.snapshot.campaigns["phone-1111"].store
    await store.adjust(delta=1, actor="elsewhere")
    # make sure this process's own flag update is not what clears it
    gateway.runtime.watch.mark_sold_out("phone-1111")

    async def buyable() -> bool:
        return "phone-1111" not in gateway.runtime.watch.sold_out

    await wait_for(buyable, within=5.0)  # by the restock notice or the next poll


async def _reserve_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


async def test_redis_down_fails_closed(gateway: Gateway, shop: Shop, redis_server: object) -> None:
    server = redis_server  # the session's private redis: stop it, then bring it back
    server.stop()  # type: ignore[attr-defined]
    try:
        response = await gateway.buy("alice")
        problem = await problem_of(response)
        assert (response.status, problem["code"]) == (503, "unavailable")
        assert response.headers["Retry-After"] in ("1", "2")  # spread by the jitter
        assert shop.seen == []
    finally:
        server.start()  # type: ignore[attr-defined]


async def test_problem_json_is_rfc9457(gateway: Gateway) -> None:
    response = await gateway.edge.get("/nowhere")
    document = json.loads(await response.read())
    assert document["type"].startswith("urn:flashgate:problem:")
    assert document["code"] == "not-found"
