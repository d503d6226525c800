"""The waiting room through the gateway's HTTP API, against a real Redis: joining,
waiting, admission, buying with the pass, and the rules that close or drop a waiter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.helpers import (
    AUTH,
    OpenGateway,
    Shop,
    check_invariant,
    problem_of,
    wait_for,
)
from tests.waiting_room_helpers import QUEUE, QUEUE_KEYS, Waiter, queue_figures, with_room

pytestmark = pytest.mark.integration


async def test_a_waiter_joins_waits_is_admitted_and_buys_with_the_pass(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis, shop: Shop
) -> None:
    with_room(settings_data)
    async with new_gateway() as gw:
        alice = Waiter(gw, "alice")
        status, joined = await alice.join()
        assert status == 202, joined
        assert joined["state"] == "waiting"
        assert joined["position"] == 1
        assert {"ticket", "eta_seconds", "poll_after"} <= joined.keys()
        admitted = await alice.wait_for_state("admitted")
        assert admitted["pass_expires_in"] > 0
        status, bought = await alice.buy(admitted["pass"])
        assert status == 201, bought
        assert len(shop.seen) == 1
        await check_invariant(redis, "phone-1111", 1)
        # the pass bought: it no longer counts against the cap, and stays good for retries
        await wait_for(lambda: _used(redis))
        assert (await alice.poll())[1]["state"] == "admitted"


async def _used(redis: Redis) -> bool:
    return (await queue_figures(redis))["used"] == 1


async def test_joining_again_returns_the_same_place(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, admit_rate=0.001)  # nobody is admitted during the test
    async with new_gateway() as gw:
        waiters = [Waiter(gw, f"user-{i}") for i in range(3)]
        for waiter in waiters:
            assert (await waiter.join())[0] == 202
        first = waiters[1].last
        status, again = await waiters[1].join()
        assert status == 202
        assert again["position"] == first["position"] == 2
        assert (await waiters[1].poll(first["ticket"]))[1]["position"] == 2
        assert (await waiters[1].poll(again["ticket"]))[1]["position"] == 2


async def test_buying_without_a_pass_names_the_queue(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis, shop: Shop
) -> None:
    with_room(settings_data)
    async with new_gateway() as gw:
        response = await gw.buy("alice")
        assert response.status == 403
        problem = await problem_of(response)
        assert problem["code"] == "queue-pass-required"
        assert problem["join"] == QUEUE
        assert problem["page"] == f"{QUEUE}/page"
        assert not shop.seen
        assert (await check_invariant(redis, "phone-1111", 1))["available"] == 10


async def test_polls_are_answered_from_memory(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    """After the first poll of each waiter, polls cost Redis nothing of their own: a
    hundred polls of ten waiters ask Redis once per waiter (a first poll here)."""
    with_room(settings_data, admit_rate=0.001, heartbeat="60s")
    async with new_gateway() as gw:
        waiters = [Waiter(gw, f"user-{i}") for i in range(10)]
        for waiter in waiters:
            await waiter.join()
        room = gw.runtime.snapshot.campaigns["phone-1111"].room
        assert room is not None
        await wait_for(lambda: room.view is not None and room.view.length == 10)
        before = dict(room.memory.counts)
        for _ in range(10):
            answers = await asyncio.gather(*(w.poll() for w in waiters))
            assert [d["position"] for _, d in answers] == list(range(1, 11))
        assert room.memory.counts["polls"] - before.get("polls", 0) == 100
        # the join told this process about each waiter: not one poll had to ask Redis
        assert room.memory.counts["redis_checks"] == before.get("redis_checks", 0)


async def test_a_second_gateway_asks_redis_once_per_waiter_then_answers_from_memory(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, admit_rate=0.001, heartbeat="60s")
    async with new_gateway() as a, new_gateway() as b:
        waiters = [Waiter(a, f"user-{i}") for i in range(5)]
        for waiter in waiters:
            await waiter.join()
        room_b = b.runtime.snapshot.campaigns["phone-1111"].room
        assert room_b is not None
        at_b = [Waiter(b, w.user) for w in waiters]
        for waiter, there in zip(at_b, waiters, strict=True):
            waiter.ticket = there.ticket
        await wait_for(lambda: room_b.view is not None and room_b.view.length == 5)
        for _ in range(4):
            answers = await asyncio.gather(*(w.poll() for w in at_b))
            assert [d["position"] for _, d in answers] == [1, 2, 3, 4, 5]
        assert room_b.memory.counts["redis_checks"] == 5


async def test_a_ticket_for_another_user_is_refused(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, admit_rate=0.001)
    async with new_gateway() as gw:
        alice, bob = Waiter(gw, "alice"), Waiter(gw, "bob")
        await alice.join()
        status, problem = await bob.poll(alice.ticket)
        assert status == 403
        assert problem["code"] == "ticket-invalid"


async def test_queue_paths_answer_405_for_other_methods(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data)
    async with new_gateway() as gw:
        response = await gw.edge.delete(QUEUE, headers={"X-User-Id": "alice"})
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD, POST"
        response = await gw.edge.post(f"{QUEUE}/page")
        assert response.status == 405


async def test_the_queue_keys_share_the_campaigns_hash_tag(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data)
    async with new_gateway() as gw:
        await Waiter(gw, "alice").join()
        await wait_for(lambda: _has_view(redis))
        keys = [k.decode() async for k in redis.scan_iter(match=f"{QUEUE_KEYS}:*")]
        assert keys
        assert all(k.startswith("fg:{phone-1111}:") for k in keys)


async def _has_view(redis: Redis) -> bool:
    return bool(await redis.exists(f"{QUEUE_KEYS}:view"))


def stock(settings_data: dict[str, Any], units: int) -> None:
    settings_data["campaigns"][0]["stock"] = units


async def test_a_waiter_further_back_than_close_factor_x_available_is_told_closed(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    stock(settings_data, 2)
    with_room(settings_data, close_factor=1.5, admit_rate=0.001)  # positions 1 to 3 may wait
    async with new_gateway() as gw:
        waiters = [Waiter(gw, f"user-{i}") for i in range(5)]
        joined = [(await w.join())[1] for w in waiters]
        assert [d["state"] for d in joined] == ["waiting"] * 3 + ["closed"] * 2
        assert [await w.state() for w in waiters[3:]] == ["closed", "closed"]
        # stock falls to 1: only position 1 may still wait
        await gw.admin.post("/campaigns/phone-1111/stock", json={"delta": -1}, headers=AUTH)
        for waiter in waiters[1:3]:
            await waiter.wait_for_state("closed")
        assert await waiters[0].state() == "waiting"
        assert (await queue_figures(redis))["waiting"] == 1
        assert await redis.scard(f"{QUEUE_KEYS}:closed") == 4
        # told closed is final: more stock does not reopen their places
        await gw.admin.post("/campaigns/phone-1111/stock", json={"delta": 5}, headers=AUTH)
        assert await waiters[1].state() == "closed"


async def test_after_sell_out_every_waiter_is_closed_and_joining_answers_sold_out(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis, shop: Shop
) -> None:
    stock(settings_data, 1)
    with_room(settings_data, max_passes_per_unit=1)
    async with new_gateway() as gw:
        alice, bob, carol = (Waiter(gw, u) for u in ("alice", "bob", "carol"))
        for waiter in (alice, bob, carol):
            await waiter.join()
        admitted = await alice.wait_for_state("admitted")
        assert await bob.state() == "waiting"
        assert (await alice.buy(admitted["pass"]))[0] == 201
        await bob.wait_for_state("closed")
        await carol.wait_for_state("closed")
        status, problem = await Waiter(gw, "dave").join()
        assert (status, problem["code"]) == (409, "sold-out")
        await wait_for(lambda: _waiting(redis, 0))  # the room closes them in Redis too
        assert len(shop.seen) == 1
        await check_invariant(redis, "phone-1111", 1)


async def _waiting(redis: Redis, count: int) -> bool:
    return (await queue_figures(redis))["waiting"] == count


async def keep_polling(waiter: Waiter) -> None:
    while True:
        await waiter.poll()
        await asyncio.sleep(0.2)  # a client's poll interval, well within the heartbeat


async def test_a_waiter_who_stops_polling_loses_the_place_to_the_next(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    stock(settings_data, 1)
    with_room(settings_data, max_passes_per_unit=1, heartbeat="1s")
    async with new_gateway() as gw:
        carol, alice, bob = (Waiter(gw, u) for u in ("carol", "alice", "bob"))
        for waiter in (carol, alice, bob):
            await waiter.join()
        # carol holds the one pass and does not buy; alice (1st in line) walks away
        await carol.wait_for_state("admitted")
        polling = asyncio.create_task(keep_polling(bob))
        try:
            await wait_for(lambda: _abandoned(redis, 1))
            await wait_for(lambda: bob.last.get("position") == 1)
        finally:
            polling.cancel()
        assert await alice.state() == "expired"
        # joining again: the back of the line, not the old place
        status, again = await alice.join()
        assert (status, again["position"]) == (202, 2)


async def _abandoned(redis: Redis, count: int) -> bool:
    return int(await redis.hget(f"{QUEUE_KEYS}:meta", "abandoned") or 0) == count


async def test_a_pass_not_used_within_pass_ttl_goes_to_the_next_waiter(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    stock(settings_data, 1)
    with_room(settings_data, max_passes_per_unit=1, pass_ttl="1s", heartbeat="30s")
    async with new_gateway() as gw:
        alice, bob = Waiter(gw, "alice"), Waiter(gw, "bob")
        await alice.join()
        await bob.join()
        first = await alice.wait_for_state("admitted")
        assert await bob.state() == "waiting"
        second = await bob.wait_for_state("admitted")
        assert await alice.state() == "expired"
        status, problem = await alice.buy(first["pass"])
        assert (status, problem["code"]) == (403, "queue-pass-invalid")
        assert (await bob.buy(second["pass"]))[0] == 201
        assert int(await redis.hget(f"{QUEUE_KEYS}:meta", "expired") or 0) == 1


async def test_passes_beyond_the_cap_are_withdrawn_when_stock_falls(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis, shop: Shop
) -> None:
    stock(settings_data, 4)
    with_room(settings_data, max_passes_per_unit=1, heartbeat="30s")
    async with new_gateway() as gw:
        waiters = [Waiter(gw, f"user-{i}") for i in range(4)]
        for waiter in waiters:
            await waiter.join()
        passes = [(await w.wait_for_state("admitted"))["pass"] for w in waiters]
        await gw.admin.post("/campaigns/phone-1111/stock", json={"delta": -2}, headers=AUTH)
        # the two newest passes go: their holders are back at the front of the line
        for waiter in waiters[2:]:
            await waiter.wait_for_state("waiting")
        assert sorted([waiters[2].last["position"], waiters[3].last["position"]]) == [1, 2]
        status, problem = await waiters[3].buy(passes[3])
        assert (status, problem["code"], problem["reason"]) == (
            403,
            "queue-pass-invalid",
            "withdrawn",
        )
        assert [(await w.buy(p))[0] for w, p in zip(waiters[:2], passes[:2], strict=True)] == [
            201,
            201,
        ]
        figures = await queue_figures(redis)
        assert figures["passes"] == 0
        assert len(shop.seen) == 2
        await check_invariant(redis, "phone-1111", 1)
