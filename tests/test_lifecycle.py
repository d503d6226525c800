"""The reservation lifecycle: hold and confirm, deadlines, crash safety by redelivery
records and redelivery, queue mode with its dispatcher, the ledger, reconcile.

Everything runs against the session's real Redis and a real recording backend;
"crashes" are staged by writing what a dead gateway would have left behind
(through the campaign's own store) rather than by killing anything.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from redis.asyncio import Redis

from gateway.config import Settings
from gateway.core.sweeper import sweep
from gateway.embedded.server import EmbeddedRedis, free_port
from gateway.forwarding import delivery as dispatcher
from gateway.forwarding.upstream import OutboundRequest
from gateway.operations.reconcile import reconcile
from limiter.audit import Audit
from limiter.errors import StorageError
from limiter.keys import CampaignKeys, idempotency_field, new_reservation_id
from limiter.records import Attempt, ReserveStatus, State
from limiter.reserving import undo
from limiter.store import CampaignStore
from tests.helpers import (
    AUTH,
    Gateway,
    OpenGateway,
    Shop,
    accept,
    as_text,
    check_invariant,
    ledger,
    problem_of,
    settings_for,
    text,
    wait_for,
)

pytestmark = pytest.mark.integration

CAMPAIGN = "phone-1111"
BASE = f"fg:{{{CAMPAIGN}}}"
KEYS = CampaignKeys(CAMPAIGN)
ROUTE = f"/seckill/{CAMPAIGN}"


# --- helpers -------------------------------------------------------------------------


def campaign_of(settings_data: dict[str, Any]) -> dict[str, Any]:
    campaigns: list[dict[str, Any]] = settings_data["campaigns"]
    return campaigns[0]


def store_of(gateway: Gateway) -> CampaignStore:
    return gateway.runtime.snapshot.campaigns[CAMPAIGN].store


def record_key(rid: str) -> str:
    return f"{BASE}:r:{rid.rpartition('.')[2]}"


async def record_of(redis: Redis, rid: str) -> dict[str, str]:
    return as_text(await redis.hgetall(record_key(rid)))


async def state_of(redis: Redis, rid: str) -> str:
    return (await record_of(redis, rid)).get("state", "")


async def counters(redis: Redis) -> tuple[int, int, int, int]:
    """(available, reserved, sold, stock_total), read directly."""
    raw = await redis.hmget(f"{BASE}:state", "available", "reserved", "sold", "stock_total")
    values = [int(v) for v in raw if v is not None]
    assert len(values) == 4, raw
    return values[0], values[1], values[2], values[3]


async def redis_now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def reaches(redis: Redis, rid: str, *states: str) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await state_of(redis, rid) in states

    return condition


async def confirm(gateway: Gateway, rid: str) -> tuple[int, dict[str, Any]]:
    response = await gateway.admin.post(f"/reservations/{rid}/confirm", headers=AUTH)
    document: dict[str, Any] = json.loads(await response.read())
    return response.status, document


async def cancel(gateway: Gateway, rid: str) -> dict[str, Any]:
    response = await gateway.admin.post(f"/reservations/{rid}/cancel", headers=AUTH)
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def reserve_directly(store: CampaignStore, user: str, rid: str, order: bytes = b"") -> None:
    """The atomic reservation a gateway makes, and nothing more (as if it died right
    after Redis decided); with ``order``, the request it would send goes with it, as the
    gateway sends it; without, a reservation that has no order to deliver."""
    (decision,) = await store.reserve([Attempt(rid, user, 1, payload=order)])
    assert decision.status is ReserveStatus.RESERVED, decision


async def sweep_when_due(
    redis: Redis, store: CampaignStore, rid: str, actor: str = "sweeper@test"
) -> None:
    """Wait until ``rid``'s deadline has passed by Redis's clock, then sweep once (the
    gateway's own sweeper, about every second, may come first: either way it is settled
    once)."""
    deadline = int((await record_of(redis, rid))["deadline_ms"])
    assert deadline > 0

    async def due() -> bool:
        return await redis_now_ms(redis) > deadline

    await wait_for(due, within=5.0)
    await sweep(store, actor)


async def everything_stored(redis: Redis) -> str:
    """Every value of the campaign's strings, hashes and streams, as one text."""
    texts: list[str] = []
    async for key in redis.scan_iter(f"{BASE}:*"):
        kind = text(await redis.type(key))
        if kind == "string":
            texts.append(repr(await redis.get(key)))
        elif kind == "hash":
            texts.append(repr(await redis.hgetall(key)))
        elif kind == "stream":
            texts.append(repr(await redis.xrange(key)))
    return "\n".join(texts)


def ops_for(entries: list[dict[str, str]], rid: str) -> list[str]:
    return [e["op"] for e in entries if e.get("rid") == rid]


def assert_chained(entries: list[dict[str, str]]) -> None:
    """Each entry's ``before`` is the previous entry's ``after``; every figure balances."""
    for previous, entry in itertools.pairwise(entries):
        assert entry["before"] == previous["after"], (previous, entry)
    for entry in entries:
        for column in ("before", "after"):
            available, reserved, sold, total = (int(x) for x in entry[column].split("/"))
            assert total == available + reserved + sold, entry


# --- 1. hold mode ----------------------------------------------------------------------


@pytest.fixture
def hold_mode(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update({"on_success": "hold", "hold_seconds": 1})


@pytest.mark.usefixtures("hold_mode")
async def test_hold_confirm_is_a_sale_and_a_second_confirm_changes_nothing(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    response = await gateway.buy("alice", key="k-1")
    assert response.status == 201  # the backend's own answer
    rid = response.headers["X-Reservation-Id"]
    assert await state_of(redis, rid) == "held"
    assert await counters(redis) == (9, 1, 0, 10)  # a hold counts as reserved, not sold
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    # while held, a retry with the key replays the backend's answer
    replay = await gateway.buy("alice", key="k-1")
    assert (replay.status, replay.headers["Idempotent-Replayed"]) == (201, "true")
    assert await replay.json() == {"order_id": f"order-{rid}"}
    assert len(shop.seen) == 1

    status, document = await confirm(gateway, rid)
    assert status == 200, document
    assert (document["state"], document["confirmed_now"]) == ("committed", True)
    assert await counters(redis) == (9, 0, 1, 10)

    status, again = await confirm(gateway, rid)
    assert status == 200, again
    assert (again["state"], again["confirmed_now"]) == ("committed", False)
    assert await counters(redis) == (9, 0, 1, 10)
    assert ops_for(await ledger(redis, CAMPAIGN), rid) == ["reserve", "hold", "confirm"]
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)

    # a committed sale is not swept: nothing is due any more
    assert await redis.zscore(f"{BASE}:deadlines", rid) is None
    assert await sweep(store_of(gateway), "test") == 0


@pytest.mark.usefixtures("hold_mode")
async def test_an_unconfirmed_hold_expires_once_and_a_late_confirm_is_refused(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    rid = (await gateway.buy("alice")).headers["X-Reservation-Id"]
    assert await state_of(redis, rid) == "held"
    assert (await gateway.buy("alice")).status == 403  # the hold uses alice's quota

    # hold_seconds (1 s) after the backend's answer, it is due and a sweep expires it
    await sweep_when_due(redis, store_of(gateway), rid)
    assert await state_of(redis, rid) == "expired"
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (10, 0, 0)
    record = await record_of(redis, rid)
    assert record["reason"] == "deadline passed"
    assert ops_for(await ledger(redis, CAMPAIGN), rid) == ["reserve", "hold", "expired"]

    # more sweeps (and more sweepers) change nothing
    for actor in ("sweeper-a", "sweeper-b"):
        assert await sweep(store_of(gateway), actor) == 0
    assert await counters(redis) == (10, 0, 0, 10)

    # a confirm after the expiry is refused and changes no figure
    status, problem = await confirm(gateway, rid)
    assert (status, problem["code"]) == (409, "expired"), problem
    assert (problem["reservation_id"], problem["state"]) == (rid, "expired")
    assert await state_of(redis, rid) == "expired"
    assert await counters(redis) == (10, 0, 0, 10)
    ops = ops_for(await ledger(redis, CAMPAIGN), rid)
    assert ops.count("expired") == 1
    assert "confirm" not in ops

    # stock and quota came back: the same user buys again
    again = await gateway.buy("alice")
    assert again.status == 201
    assert again.headers["X-Reservation-Id"] != rid
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.mark.usefixtures("hold_mode")
async def test_cancel_of_a_confirmed_sale_returns_the_stock_once(
    gateway: Gateway, redis: Redis
) -> None:
    rid = (await gateway.buy("alice")).headers["X-Reservation-Id"]
    assert (await confirm(gateway, rid))[0] == 200
    assert await counters(redis) == (9, 0, 1, 10)

    first = await cancel(gateway, rid)
    assert (first["state"], first["released_now"]) == ("cancelled", True)
    assert await counters(redis) == (10, 0, 0, 10)
    second = await cancel(gateway, rid)
    assert (second["state"], second["released_now"]) == ("cancelled", False)
    assert await counters(redis) == (10, 0, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert ops_for(await ledger(redis, CAMPAIGN), rid) == [
        "reserve",
        "hold",
        "confirm",
        "cancelled",
    ]
    # a cancelled sale cannot be confirmed back into existence
    status, problem = await confirm(gateway, rid)
    assert (status, problem["code"]) == (409, "expired")
    assert await counters(redis) == (10, 0, 0, 10)
    assert (await gateway.buy("alice")).status == 201


# --- 2. confirm against expiry -----------------------------------------------------------

RACERS = 40


@pytest.fixture
def hold_race(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update({"on_success": "hold", "hold_seconds": 1, "stock": 50})


@pytest.mark.usefixtures("hold_race")
async def test_confirms_racing_sweepers_settle_each_hold_exactly_once(
    gateway: Gateway, redis: Redis
) -> None:
    responses = await asyncio.gather(*(gateway.buy(f"user-{i}") for i in range(RACERS)))
    assert [r.status for r in responses] == [201] * RACERS
    rids = [r.headers["X-Reservation-Id"] for r in responses]
    for rid in rids:
        assert await state_of(redis, rid) == "held"
    deadlines = {rid: int((await record_of(redis, rid))["deadline_ms"]) for rid in rids}

    async def passed() -> bool:
        return await redis_now_ms(redis) > max(deadlines.values())

    await wait_for(passed, within=5.0)

    async def confirm_later(delay: float, rid: str) -> tuple[int, dict[str, Any]]:
        await asyncio.sleep(delay)  # pacing the confirms (the scenario), not a wait
        return await confirm(gateway, rid)

    # The sweepers work through the due list from the earliest deadline; the confirms
    # come from the other end, a few at a time, so that the two meet somewhere inside.
    store = store_of(gateway)
    sweeps = [asyncio.ensure_future(sweep(store, f"racer-{i}")) for i in range(4)]
    latest_first = sorted(rids, key=lambda rid: deadlines[rid], reverse=True)
    confirming = {
        rid: asyncio.ensure_future(confirm_later(0.004 * (i // 2), rid))
        for i, rid in enumerate(latest_first)
    }
    confirms = [confirming[rid] for rid in rids]
    results = await asyncio.gather(*confirms)
    await asyncio.gather(*sweeps)
    # whatever the background sweeper (or the racers) left is settled by one more sweep
    await sweep(store, "after-the-race")

    entries = await ledger(redis, CAMPAIGN)
    committed, expired = [], []
    for rid, (status, document) in zip(rids, results, strict=True):
        final = await state_of(redis, rid)
        ops = ops_for(entries, rid)
        settled = [op for op in ops if op in ("confirm", "expired")]
        assert len(settled) == 1, (rid, ops)
        if final == "committed":
            committed.append(rid)
            assert settled == ["confirm"]
            assert (status, document["confirmed_now"]) == (200, True), document
        else:
            expired.append(rid)
            assert (final, settled) == ("expired", ["expired"]), (rid, final, ops)
            assert (status, document["code"]) == (409, "expired"), document
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (
        50 - len(committed),
        0,
        len(committed),
    )
    assert len(committed) + len(expired) == RACERS
    assert await redis.zcard(f"{BASE}:deadlines") == 0


# --- 3. crash safety, without killing anything ------------------------------------------


@pytest.fixture
def short_deadline(settings_data: dict[str, Any], shop: Shop) -> None:
    # forward_deadline must exceed the upstream timeout
    settings_data["upstreams"] = {"shop": {"url": shop.url, "timeout": 0.5}}
    campaign_of(settings_data)["forward_deadline"] = 1


@pytest.mark.usefixtures("short_deadline")
async def test_a_reservation_never_handed_over_goes_back_at_its_deadline(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    store = store_of(gateway)
    rid = f"{CAMPAIGN}.{'a1' * 10}"
    await reserve_directly(store, "alice", rid)  # ... and the gateway "dies" here
    record = await record_of(redis, rid)
    assert record["state"] == "reserved"
    assert int(record["deadline_ms"]) - int(record["created_ms"]) == 1000
    assert await counters(redis) == (9, 1, 0, 10)
    assert (await gateway.buy("alice")).status == 403  # her quota is taken meanwhile

    # the gateway's own sweeper releases it, forward_deadline (1 s) after it was made
    await wait_for(reaches(redis, rid, "expired"), within=8.0)
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (10, 0, 0)
    assert ops_for(await ledger(redis, CAMPAIGN), rid) == ["reserve", "expired"]
    assert shop.seen == []  # nothing was ever sent, and nothing is sent now
    assert await redis.xlen(f"{BASE}:orders") == 0  # nor queued for the dispatcher
    assert (await gateway.buy("alice")).status == 201


def handed_over_order(rid: str, user: str) -> OutboundRequest:
    headers = CIMultiDict(
        {
            "Content-Type": "application/json",
            "X-Reservation-Id": rid,
            "X-Campaign-Id": CAMPAIGN,
            "X-User-Id": user,
            "X-Quantity": "1",
        }
    )
    return OutboundRequest("POST", f"{ROUTE}?ref=crash", headers, b'{"address": "here"}')


@pytest.mark.usefixtures("short_deadline")
async def test_a_handed_over_reservation_is_redelivered_not_released(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    store = store_of(gateway)
    rid = f"{CAMPAIGN}.{'b2' * 10}"
    # the gateway reserved with its order, sent it, and died before the answer
    await reserve_directly(store, "alice", rid, handed_over_order(rid, "alice").encode())

    await wait_for(reaches(redis, rid, "committed"), within=8.0)
    (seen,) = shop.seen  # delivered again, exactly once, as it was recorded
    assert seen.headers["X-Reservation-Id"] == rid
    assert (seen.method, seen.path_qs, seen.body) == (
        "POST",
        f"{ROUTE}?ref=crash",
        b'{"address": "here"}',
    )
    assert seen.headers["X-User-Id"] == "alice"
    record = await record_of(redis, rid)
    assert record["mode"] == "redelivery"
    assert record["reply_status"] == "201"
    ops = ops_for(await ledger(redis, CAMPAIGN), rid)
    assert ops == ["reserve", "redeliver", "commit"], ops
    assert "expired" not in ops
    assert "released" not in ops
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (9, 0, 1)
    # later sweeps find nothing to do: it is neither expired nor redelivered again
    assert await sweep(store, "later") == 0
    assert await redis.zcard(f"{BASE}:deadlines") == 0
    assert len(shop.seen) == 1


@pytest.mark.usefixtures("short_deadline")
async def test_sweeping_a_handed_over_reservation_queues_it_once(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    """Many sweepers at the deadline: one queues the redelivery, the others see nothing
    due; the units stay reserved meanwhile (only the backend knows if it took the order)."""
    gate = asyncio.Event()

    async def held_up(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return await accept(request)

    shop.respond = held_up
    store = store_of(gateway)
    rid = f"{CAMPAIGN}.{'c3' * 10}"
    await reserve_directly(store, "alice", rid, handed_over_order(rid, "alice").encode())
    deadline = int((await record_of(redis, rid))["deadline_ms"])

    async def due() -> bool:
        return await redis_now_ms(redis) > deadline

    await wait_for(due, within=5.0)
    try:
        settled = await asyncio.gather(*(sweep(store, f"sweeper-{i}") for i in range(5)))
        assert sum(settled) <= 1  # the gateway's own sweeper may have been first
        await wait_for(lambda: len(shop.seen) == 1, within=5.0)
        assert await redis.xlen(f"{BASE}:orders") == 1  # queued once
        assert await state_of(redis, rid) == "reserved"
        assert await counters(redis) == (9, 1, 0, 10)
        assert ops_for(await ledger(redis, CAMPAIGN), rid) == ["reserve", "redeliver"]
        assert await sweep(store, "again") == 0  # no longer due: it waits for the backend
    finally:
        gate.set()
    await wait_for(reaches(redis, rid, "committed"), within=5.0)
    assert shop.reservation_ids() == [rid]
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


# --- 4. queue mode --------------------------------------------------------------------


@pytest.fixture
def queue_mode(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update({"forward": "queue"})


async def status_of(
    gateway: Gateway, rid: str, user: str | None = "alice"
) -> tuple[int, dict[str, Any]]:
    headers = {"X-User-Id": user} if user is not None else {}
    response = await gateway.edge.get(f"/reservations/{rid}", headers=headers)
    document: dict[str, Any] = json.loads(await response.read())
    return response.status, document


@pytest.mark.usefixtures("queue_mode")
async def test_queue_mode_answers_202_and_the_buyer_polls_to_the_outcome(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    response = await gateway.buy("alice", key="k-1", json={"quantity": 1, "note": "gift"})
    assert response.status == 202
    document = await response.json()
    rid = document["reservation_id"]
    assert document == {
        "reservation_id": rid,
        "status_url": f"/reservations/{rid}",
        "state": "reserved",
    }
    assert response.headers["Location"] == f"/reservations/{rid}"
    assert response.headers["X-Reservation-Id"] == rid
    assert "Idempotent-Replayed" not in response.headers

    async def committed() -> bool:
        status, polled = await status_of(gateway, rid)
        assert status == 200, polled
        return bool(polled["state"] == "committed")

    await wait_for(committed, within=8.0)
    status, polled = await status_of(gateway, rid)
    assert (polled["reservation_id"], polled["campaign"], polled["quantity"]) == (
        rid,
        CAMPAIGN,
        1,
    )
    reply = polled["reply"]
    assert reply["status"] == 201
    assert reply["content_type"].startswith("application/json")
    assert json.loads(reply["body"]) == {"order_id": f"order-{rid}"}

    (seen,) = shop.seen
    assert seen.headers["X-Reservation-Id"] == rid
    assert (seen.headers["X-User-Id"], seen.headers["X-Quantity"]) == ("alice", "1")
    assert json.loads(seen.body) == {"quantity": 1, "note": "gift"}

    # only the buyer sees it: no identity is 401, anyone else (or a made-up id) 404
    status, problem = await status_of(gateway, rid, user=None)
    assert (status, problem["code"]) == (401, "unauthenticated")
    status, problem = await status_of(gateway, rid, user="mallory")
    assert (status, problem["code"]) == (404, "not-found")
    status, problem = await status_of(gateway, f"{CAMPAIGN}.{'0' * 20}")
    assert (status, problem["code"]) == (404, "not-found")
    status, problem = await status_of(gateway, "not-a-reservation")
    assert (status, problem["code"]) == (404, "not-found")

    # a retry with the key (the same request) replays the 202; not queued or sent again
    replay = await gateway.buy("alice", key="k-1", json={"quantity": 1, "note": "gift"})
    assert replay.status == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Location"] == f"/reservations/{rid}"
    assert await replay.json() == {
        "reservation_id": rid,
        "status_url": f"/reservations/{rid}",
        "state": "committed",
    }
    await asyncio.sleep(0.2)  # a check that nothing happens: no second delivery meanwhile
    assert len(shop.seen) == 1
    assert ops_for(await ledger(redis, CAMPAIGN), rid) == ["reserve", "commit"]
    assert (await redis.xpending(f"{BASE}:orders", "flashgate"))["pending"] == 0
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (9, 0, 1)


@pytest.mark.usefixtures("queue_mode")
async def test_queue_mode_retry_while_queued_replays_202_and_delivers_once(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    gate = asyncio.Event()

    async def held_up(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return await accept(request)

    shop.respond = held_up
    try:
        first = await gateway.buy("alice", key="k-1")
        rid = (await first.json())["reservation_id"]
        await wait_for(lambda: len(shop.seen) == 1, within=5.0)
        replays = await asyncio.gather(*(gateway.buy("alice", key="k-1") for _ in range(5)))
        for replay in replays:
            assert (replay.status, replay.headers["Idempotent-Replayed"]) == (202, "true")
            assert await replay.json() == {
                "reservation_id": rid,
                "status_url": f"/reservations/{rid}",
                "state": "reserved",
            }
        assert (await status_of(gateway, rid))[1]["state"] == "reserved"
    finally:
        gate.set()
    await wait_for(reaches(redis, rid, "committed"), within=5.0)
    assert shop.reservation_ids() == [rid]
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.fixture
def shaved(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update({"forward": "queue", "stock": 60, "max_inflight": 3})


@pytest.mark.slow
@pytest.mark.usefixtures("shaved")
async def test_queue_mode_shaves_the_peak_to_max_inflight_across_gateways(
    gateway: Gateway,
    shop: Shop,
    redis: Redis,
    new_gateway: OpenGateway,
) -> None:
    """Two gateways, two dispatchers (each could run 3 deliveries on its own): the slots in
    Redis keep the backend at 3 requests at once in all."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.1)  # the backend's own slowness: deliveries overlap
        return await accept(request)

    shop.respond = slow
    async with new_gateway() as other:
        edges = (gateway, other)
        responses = await asyncio.gather(*(edges[i % 2].buy(f"buyer-{i}") for i in range(60)))
        assert [r.status for r in responses] == [202] * 60
        rids = {(await r.json())["reservation_id"] for r in responses}

        async def all_sold() -> bool:
            available, reserved, sold, _ = await counters(redis)
            return (available, reserved, sold) == (0, 0, 60)

        await wait_for(all_sold, within=20.0)
    assert shop.max_in_flight == 3
    seen = shop.reservation_ids()
    assert len(seen) == len(set(seen)) == 60  # each order delivered exactly once
    assert set(seen) == rids
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert await redis.zcard(f"{BASE}:inflight") == 0  # every delivery slot was given back


async def test_a_timed_out_delivery_keeps_its_place_while_the_backend_may_still_work(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    """The gateway gives up after 0.3 s, the backend works 0.45 s: the retry must not go out
    on top of a request the backend is still running."""
    settings_data["upstreams"]["shop"]["timeout"] = 0.3
    campaign_of(settings_data).update(
        forward="queue", stock=4, max_inflight=2, max_attempts=2, retry_backoff="50ms"
    )

    working = peak = 0

    async def work() -> None:  # goes on when the gateway hangs up, as a backend's would
        nonlocal working, peak
        working += 1
        peak = max(peak, working)
        try:
            await asyncio.sleep(0.45)  # the backend's own work, longer than the 0.3 s timeout
        finally:
            working -= 1

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.shield(asyncio.ensure_future(work()))
        return await accept(request)

    shop.respond = slow
    async with new_gateway() as gw:
        responses = await asyncio.gather(*(gw.buy(f"buyer-{i}") for i in range(4)))
        assert [r.status for r in responses] == [202] * 4
        await wait_for(dead_letters_at_least(redis, 4), within=15.0)
    assert len(shop.seen) == 8  # every order tried twice, each time cut off
    assert peak <= 2
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (4, 0, 0)


async def test_a_queued_order_whose_buyer_was_told_503_is_never_delivered(
    redis: Redis,
    redis_server: EmbeddedRedis,
    new_gateway: OpenGateway,
    settings_data: dict[str, Any],
    shop: Shop,
) -> None:
    """Redis pauses with the reserve call written: the buyer gets 503 ("given back").
    When Redis wakes it runs the call, order and all; the order must not be sold."""
    process = redis_server.process
    assert process is not None
    settings_data["redis"] = {"url": redis_server.url, "timeout": "200ms"}
    campaign_of(settings_data).update(forward="queue", stock=3)
    async with new_gateway() as gw:
        assert (await gw.buy("warm-up")).status == 202  # connections open, dispatcher on
        await wait_for(lambda: len(shop.seen) == 1)
        process.send_signal(signal.SIGSTOP)
        try:
            refused = await gw.buy("alice")
            assert (await problem_of(refused))["code"] == "unavailable"
            await asyncio.sleep(0.5)  # the outage goes on after the 503 (the scenario)
        finally:
            process.send_signal(signal.SIGCONT)

        async def reserved_then_given_back() -> bool:
            entries = await ledger(redis, CAMPAIGN)
            return [e["op"] for e in entries if e.get("user") == "alice"] == [
                "reserve",
                "released",
            ]

        await wait_for(reserved_then_given_back, within=10.0)

        async def queue_empty() -> bool:  # the dispatcher dropped the order, undelivered
            return int(await redis.xlen(f"{BASE}:orders")) == 0

        await wait_for(queue_empty, within=5.0)
    assert [seen.headers["X-User-Id"] for seen in shop.seen] == ["warm-up"]
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["sold"]) == (2, 1)


async def reserved_for_a_503(store: CampaignStore, user: str, key: str) -> str:
    """A reserve Redis ran after its gateway had told the buyer 503: reserved, with its
    order kept, never handed over."""
    rid = new_reservation_id(CAMPAIGN)
    payload = handed_over_order(rid, user).encode()
    attempt = Attempt(rid, user, 1, idempotency_field(user, key), payload)
    (decision,) = await store.reserve([attempt])
    assert decision.status is ReserveStatus.RESERVED
    return rid


async def test_a_retry_told_202_gets_the_order_its_first_request_was_told_503_for(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    """The first request gave up (503) on a reserve Redis ran anyway; the buyer retries
    with the key before the undo lands: the replayed 202 hands the order over, and the
    undo then leaves it to its delivery."""
    campaign_of(settings_data).update(forward="queue", stock=3)
    async with new_gateway() as gw:
        store = gw.runtime.snapshot.campaigns[CAMPAIGN].store
        rid = await reserved_for_a_503(store, "alice", "k-1")
        await asyncio.sleep(0.3)  # a check that nothing happens: no delivery meanwhile
        assert shop.seen == []  # not handed over: nobody delivers it
        retry = await gw.buy("alice", key="k-1")
        assert (retry.status, retry.headers["Idempotent-Replayed"]) == (202, "true")
        assert retry.headers["X-Reservation-Id"] == rid
        await undo(store, [rid], "gateway")  # the first request's undo, late
        await wait_for(reaches(redis, rid, "committed"), within=5.0)
    assert [seen.headers["X-Reservation-Id"] for seen in shop.seen] == [rid]
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_a_retry_whose_hand_over_redis_did_not_confirm_is_not_told_given_back(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    """The hand-over may have happened (then it is delivered): the answer says the
    outcome is unknown and how to learn it, never that the units were given back."""
    campaign_of(settings_data).update(forward="queue", stock=3)
    async with new_gateway() as gw:
        store = gw.runtime.snapshot.campaigns[CAMPAIGN].store
        rid = await reserved_for_a_503(store, "alice", "k-1")
        hand_over = store.hand_over

        async def applied_but_unconfirmed(reservation_id: str) -> bool:
            await hand_over(reservation_id)
            raise StorageError("redis did not answer hand over an order within 0.25s")

        store.hand_over = applied_but_unconfirmed  # type: ignore[method-assign]
        retry = await gw.buy("alice", key="k-1")
        problem = await problem_of(retry)
        assert (retry.status, problem["code"], problem["reservation_id"]) == (
            503,
            "unavailable",
            rid,
        )
        assert "given back" not in problem["detail"]
        assert "same Idempotency-Key" in problem["detail"]
        store.hand_over = hand_over  # type: ignore[method-assign]
        again = await gw.buy("alice", key="k-1")  # and a retry learns it
        assert (again.status, again.headers["Idempotent-Replayed"]) == (202, "true")
        await wait_for(reaches(redis, rid, "committed"), within=5.0)
    assert [seen.headers["X-Reservation-Id"] for seen in shop.seen] == [rid]
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_an_order_being_delivered_is_kept_from_other_dispatchers(
    redis: Redis,
    new_gateway: OpenGateway,
    settings_data: dict[str, Any],
    shop: Shop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the backend works, the order's idle time is reset now and then: another
    dispatcher claims only orders idle for long (a dead dispatcher's)."""
    monkeypatch.setattr(dispatcher, "KEEP_EVERY", 0.2, raising=False)
    settings_data["upstreams"]["shop"]["timeout"] = 5.0
    campaign_of(settings_data).update(forward="queue", stock=1)

    working = asyncio.Event()

    async def busy(request: web.Request) -> web.StreamResponse:
        await working.wait()  # the backend works until the test lets it answer
        return await accept(request)

    async def kept_twice() -> bool:  # each keep is an XCLAIM: the delivery count grows
        pending = await redis.xpending_range(f"{BASE}:orders", "flashgate", "-", "+", 10)
        return len(pending) == 1 and int(pending[0]["times_delivered"]) >= 3

    shop.respond = busy
    async with new_gateway() as gw:
        response = await gw.buy("alice")
        assert response.status == 202
        rid = (await response.json())["reservation_id"]
        await wait_for(lambda: len(shop.seen) == 1)
        await wait_for(kept_twice)  # while the backend is still at work
        working.set()
        await wait_for(reaches(redis, rid, "committed"), within=5.0)
    assert len(shop.seen) == 1
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.fixture
def flaky_queue(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        {
            "forward": "queue",
            "stock": 30,
            "max_inflight": 2,
            "max_attempts": 2,
            "retry_backoff": "100ms",
            "max_retry_backoff": "1s",
        }
    )


def dead_letters_at_least(redis: Redis, count: int) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return int(await redis.xlen(f"{BASE}:dead")) >= count

    return condition


async def _settle_after_an_outage(
    gateway: Gateway, shop: Shop, redis: Redis, answered: collections.Counter[str]
) -> None:
    """After the outage: each order committed once, or dead-lettered with its stock back."""

    async def settled() -> bool:
        return (await counters(redis))[1] == 0

    await wait_for(settled, within=20.0)
    letters = [as_text(fields or {}) for _, fields in await redis.xrange(f"{BASE}:dead") or []]
    dead = {letter["rid"]: letter for letter in letters}
    assert len(dead) == len(letters), "an order was dead-lettered twice"
    committed = set()
    for rid in {s.headers["X-Reservation-Id"] for s in shop.seen} | set(dead):
        final = await state_of(redis, rid)
        if final == "committed":
            committed.add(rid)
            assert answered[rid] == 1, rid  # accepted once: never a second order
            assert rid not in dead
        else:
            assert final == "released", (rid, final)
            assert answered[rid] == 0, rid
            letter = dead[rid]
            order = OutboundRequest.decode(letter["payload"].encode())
            assert order.headers["X-Reservation-Id"] == rid
            assert (order.method, order.path_qs) == ("POST", ROUTE)
            assert letter["attempts"] == "2"
            assert (await record_of(redis, rid))["reason"].startswith(
                "dead-lettered after 2 failed deliveries"
            )
    assert dead, "some orders should have run out of attempts during the outage"
    assert committed, "some orders should have been delivered after the outage"
    assert len(committed) + len(dead) == 30
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (
        30 - len(committed),
        0,
        len(committed),
    )
    # every dead-lettered buyer got the quota back and may try again
    for rid in dead:
        user = (await record_of(redis, rid))["user"]
        assert await redis.hget(f"{BASE}:users", user) is None


@pytest.mark.usefixtures("flaky_queue")
async def test_queue_mode_backend_answering_503_for_a_while(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    down = True
    answered: collections.Counter[str] = collections.Counter()

    async def flaky(request: web.Request) -> web.StreamResponse:
        if down:
            return web.Response(status=503, text="maintenance")
        answered[request.headers["X-Reservation-Id"]] += 1
        await asyncio.sleep(0.02)  # the backend's own pace
        return await accept(request)

    shop.respond = flaky
    responses = await asyncio.gather(*(gateway.buy(f"buyer-{i}") for i in range(30)))
    assert [r.status for r in responses] == [202] * 30
    await wait_for(dead_letters_at_least(redis, 2), within=10.0)
    down = False
    await _settle_after_an_outage(gateway, shop, redis, answered)
    # a failed order was tried at most max_attempts times
    assert max(collections.Counter(shop.reservation_ids()).values()) <= 2


async def test_queue_mode_backend_refusing_connections_for_a_while(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    """A real outage: nothing listens on the backend's port, then the shop comes up there."""
    port = free_port()
    settings_data["upstreams"] = {"shop": {"url": f"http://127.0.0.1:{port}", "timeout": 1.0}}
    campaign_of(settings_data).update(
        {
            "forward": "queue",
            "stock": 30,
            "max_inflight": 2,
            "max_attempts": 2,
            "retry_backoff": "100ms",
        }
    )
    answered: collections.Counter[str] = collections.Counter()

    async def counting(request: web.Request) -> web.StreamResponse:
        answered[request.headers["X-Reservation-Id"]] += 1
        await asyncio.sleep(0.02)  # the backend's own pace
        return await accept(request)

    restored = Shop(respond=counting)
    async with new_gateway() as gw:
        responses = await asyncio.gather(*(gw.buy(f"buyer-{i}") for i in range(30)))
        assert [r.status for r in responses] == [202] * 30
        await wait_for(dead_letters_at_least(redis, 2), within=10.0)
        server = TestServer(restored.app(), host="127.0.0.1", port=port)
        await server.start_server()
        try:
            await _settle_after_an_outage(gw, restored, redis, answered)
        finally:
            await server.close()


@pytest.mark.usefixtures("queue_mode")
async def test_queue_mode_backend_refusal_releases(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "address missing"}, status=422)

    shop.respond = refuse
    response = await gateway.buy("alice", key="k-1")
    assert response.status == 202
    rid = (await response.json())["reservation_id"]
    await wait_for(reaches(redis, rid, "released"), within=8.0)
    status, polled = await status_of(gateway, rid)
    assert (status, polled["state"]) == (200, "released")
    assert polled["reason"] == "upstream answered 422"
    assert shop.reservation_ids() == [rid]  # a refusal is final: not retried
    assert await redis.xlen(f"{BASE}:dead") == 0
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (10, 0, 0)
    assert ops_for(await ledger(redis, CAMPAIGN), rid) == ["reserve", "released"]
    # the key is free again: the same request is a fresh attempt
    shop.respond = accept
    fresh = await gateway.buy("alice", key="k-1")
    assert fresh.status == 202
    assert "Idempotent-Replayed" not in fresh.headers
    second = (await fresh.json())["reservation_id"]
    assert second != rid
    await wait_for(reaches(redis, second, "committed"), within=8.0)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.mark.usefixtures("queue_mode")
async def test_queued_orders_keep_no_credentials_in_redis(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    secret = "session-secret-4711"
    credentials = {"Cookie": f"sid={secret}", "Authorization": f"Bearer {secret}"}
    response = await gateway.buy("alice", headers={**credentials, "X-Note": "gift"})
    assert response.status == 202
    rid = (await response.json())["reservation_id"]
    assert secret not in await everything_stored(redis)
    await wait_for(reaches(redis, rid, "committed"), within=8.0)
    delivered = {k.lower(): v for k, v in shop.seen[0].headers.items()}
    assert {"cookie", "authorization"}.isdisjoint(delivered)
    assert (delivered["x-user-id"], delivered["x-note"]) == ("alice", "gift")


@pytest.mark.usefixtures("queue_mode")
async def test_an_outcome_waits_while_the_campaigns_counters_are_missing(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    state_key = f"{BASE}:state"
    saved: dict[Any, Any] = {}

    async def answer_while_counters_vanish(request: web.Request) -> web.StreamResponse:
        saved.update(await redis.hgetall(state_key))
        await redis.delete(state_key)
        return await accept(request)

    shop.respond = answer_while_counters_vanish
    response = await gateway.buy("alice")
    rid = (await response.json())["reservation_id"]
    await wait_for(lambda: len(shop.seen) == 1, within=5.0)
    # a check that nothing happens: for a second the commit is refused, and the order kept
    await asyncio.sleep(1.0)
    assert await state_of(redis, rid) == "reserved"
    assert await redis.xlen(f"{BASE}:orders") == 1
    await redis.hset(state_key, mapping=saved)  # an operator restores the counters
    await wait_for(reaches(redis, rid, "committed"), within=5.0)
    assert len(shop.seen) == 1  # settled from the answer it had, not asked again
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_deliveries_carry_the_gateways_credential_and_a_401_is_retried(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    settings_data["upstreams"]["shop"]["headers"] = {"Authorization": "Bearer service-7"}
    campaign_of(settings_data).update(forward="queue", retry_backoff="100ms")
    answers = iter([401])

    async def checks_the_service(request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer service-7"
        status = next(answers, 201)  # a 401 is not the backend's decision on the order
        return web.json_response({"status": status}, status=status)

    shop.respond = checks_the_service
    async with new_gateway() as gw:
        response = await gw.buy("alice", headers={"Authorization": "Bearer buyer-secret"})
        assert response.status == 202
        rid = (await response.json())["reservation_id"]
        await wait_for(reaches(redis, rid, "committed"), within=8.0)
    assert [seen.headers["Authorization"] for seen in shop.seen] == ["Bearer service-7"] * 2
    stored = await everything_stored(redis)
    assert "service-7" not in stored
    assert "buyer-secret" not in stored
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_a_fault_of_the_dispatcher_neither_counts_nor_holds_a_delivery_slot(
    redis: Redis, new_gateway: OpenGateway, settings_data: dict[str, Any], shop: Shop
) -> None:
    campaign_of(settings_data).update(forward="queue", retry_backoff="1s", max_attempts=1)
    async with new_gateway() as gw:
        backend = gw.runtime.snapshot.upstreams["shop"]
        await backend.close()  # sending now fails in this process, not at the backend
        response = await gw.buy("alice")
        rid = (await response.json())["reservation_id"]
        # a check that nothing happens: for a second of its 1 s backoff, no slot is held
        for _ in range(10):  # while it waits to try again, the slot is free for others
            await asyncio.sleep(0.1)
            assert await redis.zcard(KEYS.delivery_slots) == 0
        assert await state_of(redis, rid) == "reserved"  # not dead-lettered: nothing failed
        await backend.open()
        await wait_for(reaches(redis, rid, "committed"), within=8.0)
    assert int(await redis.hget(KEYS.reservation(rid), "attempts") or 0) == 0
    assert len(shop.seen) == 1
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.mark.usefixtures("queue_mode")
@pytest.mark.parametrize(("answer", "outcome"), [(200, "committed"), (422, "released")])
async def test_queue_mode_outcome_is_settled_without_asking_again_when_redis_blinks(
    gateway: Gateway, shop: Shop, redis: Redis, answer: int, outcome: str
) -> None:
    """Redis refuses writes just as the backend answers: the dispatcher keeps telling
    Redis the outcome it has (it never acks an untold one, nor asks the backend again)."""

    async def answer_then_pause_redis(request: web.Request) -> web.StreamResponse:
        await redis.client_pause(1500, all=False)
        return web.json_response({"order": "answered"}, status=answer)

    shop.respond = answer_then_pause_redis
    response = await gateway.buy("alice")
    assert response.status == 202
    rid = (await response.json())["reservation_id"]
    await wait_for(reaches(redis, rid, outcome), within=10.0)
    assert shop.reservation_ids() == [rid]

    async def queue_empty() -> bool:
        return await redis.xlen(f"{BASE}:orders") == 0

    await wait_for(queue_empty, within=5.0)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_sync_release_that_redis_missed_is_retried_in_the_background(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    async def refuse_then_pause_redis(request: web.Request) -> web.StreamResponse:
        await redis.client_pause(1000, all=False)
        return web.json_response({"error": "address missing"}, status=422)

    shop.respond = refuse_then_pause_redis
    response = await gateway.buy("alice")
    assert response.status == 422  # the backend's refusal goes back unchanged
    rid = response.headers["X-Reservation-Id"]
    # well before its deadline (which would ask the backend again)
    await wait_for(reaches(redis, rid, "released"), within=5.0)
    assert shop.reservation_ids() == [rid]
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


# --- 5. the ledger ----------------------------------------------------------------------


@pytest.mark.usefixtures("hold_mode")
async def test_every_state_change_is_a_ledger_entry_and_the_entries_chain(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    jane = {**AUTH, "X-Actor": "ops-jane"}
    store = store_of(gateway)

    # accepted (held), paid (confirm), returned after the sale (cancelled)
    alice = (await gateway.buy("alice")).headers["X-Reservation-Id"]
    assert (await gateway.admin.post(f"/reservations/{alice}/confirm", headers=jane)).status == 200
    assert (await gateway.admin.post(f"/reservations/{alice}/cancel", headers=jane)).status == 200

    # refused by the backend (released)
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "no"}, status=409)

    shop.respond = refuse
    bob = (await gateway.buy("bob")).headers["X-Reservation-Id"]
    shop.respond = accept

    # accepted and never paid (expired)
    carol = (await gateway.buy("carol")).headers["X-Reservation-Id"]
    await sweep_when_due(redis, store, carol)
    assert await state_of(redis, carol) == "expired"

    # confirmed before the backend's answer came back: refused (only a held order is
    # confirmed), nothing changes; then the backend's 2xx holds it and a confirm commits
    dave = f"{CAMPAIGN}.{'d4' * 10}"
    await reserve_directly(store, "dave", dave)
    early = await gateway.admin.post(f"/reservations/{dave}/confirm", headers=jane)
    early_problem = await problem_of(early)
    assert (early.status, early_problem["code"], early_problem["state"]) == (
        409,
        "not-held",
        "reserved",
    )
    await store.commit(dave, target=State.HELD, hold_ms=60_000)
    assert (await gateway.admin.post(f"/reservations/{dave}/confirm", headers=jane)).status == 200

    # an operator adds stock
    added = await gateway.admin.post(
        f"/campaigns/{CAMPAIGN}/stock", headers=jane, json={"delta": 3}
    )
    assert added.status == 200

    entries = await ledger(redis, CAMPAIGN)
    assert entries[0]["op"] == "init"
    assert entries[0]["before"] == "0/0/0/0"
    assert_chained(entries)
    available, reserved, sold, total = await counters(redis)
    assert entries[-1]["after"] == f"{available}/{reserved}/{sold}/{total}" == "12/0/1/13"

    assert ops_for(entries, alice) == ["reserve", "hold", "confirm", "cancelled"]
    assert ops_for(entries, bob) == ["reserve", "released"]
    assert ops_for(entries, carol) == ["reserve", "hold", "expired"]
    assert ops_for(entries, dave) == ["reserve", "hold", "confirm"]
    by_op = {(e["op"], e.get("rid", "")): e for e in entries}
    # who did it
    assert by_op[("confirm", alice)]["by"] == "admin:ops-jane"
    assert by_op[("cancelled", alice)]["by"] == "admin:ops-jane"
    assert by_op[("confirm", dave)]["by"] == "admin:ops-jane"
    assert by_op[("expired", carol)]["by"].startswith("sweeper@")
    (adjust,) = [e for e in entries if e["op"] == "adjust"]
    assert (adjust["by"], adjust["qty"]) == ("admin:ops-jane", "3")
    assert (adjust["before"], adjust["after"]) == ("9/0/1/10", "12/0/1/13")
    # and why, for the releases
    assert by_op[("released", bob)]["why"] == "upstream answered 409"
    assert by_op[("expired", carol)]["why"] == "deadline passed"
    assert by_op[("cancelled", alice)]["why"] == "cancelled by an operator"
    users = {alice: "alice", bob: "bob", carol: "carol", dave: "dave"}
    for entry in entries:
        if entry["rid"]:
            assert (entry["user"], entry["qty"]) == (users[entry["rid"]], "1"), entry
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.fixture
def short_ledger(settings_data: dict[str, Any]) -> None:
    settings_data["ledger"] = {"max_length": 100}
    campaign_of(settings_data)["stock"] = 1000


@pytest.mark.usefixtures("short_ledger")
async def test_the_ledger_keeps_about_max_length_entries(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    """``XADD ... MAXLEN ~ 100`` trims only whole nodes of the stream's radix tree, and
    only while what stays is at least 100 entries: the stream keeps between 100 and
    100 + one node's worth of entries. A node holds at most stream-node-max-entries (100
    by default) and stream-node-max-bytes (4 KB: some 30 ledger entries), so about 100 to
    130 here, whatever the number of changes; 300 is a generous bound that still proves
    the trimming (about 600 changes are made)."""
    store = store_of(gateway)
    for i in range(200):  # ~600 changes: 200 sales (reserve + commit), 200 adjustments
        assert (await gateway.buy(f"buyer-{i}")).status == 201
        await store.adjust(delta=1, actor=f"ops-{i}")
    length = int(await redis.xlen(f"{BASE}:ledger"))
    node = await redis.config_get("stream-node-max-entries")
    node_size = int(node["stream-node-max-entries"] or 100)
    assert 100 <= length <= min(300, 100 + node_size), (length, node_size)
    entries = await ledger(redis, CAMPAIGN)
    assert "init" not in [e["op"] for e in entries]  # the oldest went first
    assert entries[-1]["by"] == "ops-199"  # the newest stayed
    assert_chained(entries)  # what is kept is still one unbroken chain
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert entries[-1]["after"] == "1000/0/200/1200"
    assert (state["available"], state["sold"], state["stock_total"]) == (1000, 200, 1200)


# --- 6. reconcile -----------------------------------------------------------------------


async def audit_once(
    settings: Settings, url: str, *, repair: bool = False, only: str | None = None
) -> Audit:
    (audit,) = (await reconcile(settings, url, only=only, repair=repair, progress=False)).campaigns
    return audit


async def _mixed_campaign(gateway: Gateway, shop: Shop) -> None:
    """2 sold (alice, bob), 1 released (carol), 1 still reserved (dave): 7/1/2/10."""
    assert (await gateway.buy("alice")).status == 201
    assert (await gateway.buy("bob")).status == 201

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400)

    shop.respond = refuse
    assert (await gateway.buy("carol")).status == 400
    shop.respond = accept
    await reserve_directly(store_of(gateway), "dave", f"{CAMPAIGN}.{'d4' * 10}")


def failing_checks(audit: Audit) -> set[str]:
    return {what for what, counter, expected in audit.checks() if counter != expected}


async def test_reconcile_finds_drift_and_repairs_it(
    gateway: Gateway,
    shop: Shop,
    redis: Redis,
    redis_server: EmbeddedRedis,
    settings_data: dict[str, Any],
) -> None:
    settings = settings_for(settings_data)
    await _mixed_campaign(gateway, shop)

    clean = await audit_once(settings, redis_server.url)
    assert clean.campaign_id == CAMPAIGN
    assert tuple(clean.counters) == (7, 1, 2, 10)
    assert (clean.reserved_by_records, clean.sold_by_records) == (1, 2)
    assert (clean.users_differing, clean.user_drift) == (0, [])
    assert clean.ledger_after is not None
    assert tuple(clean.ledger_after) == (7, 1, 2, 10)
    assert not clean.drift, clean.checks()
    assert clean.repaired is None

    # three phantom units, and the quota hash disagreeing with the records three ways
    await redis.hincrby(f"{BASE}:state", "available", 3)
    await redis.hset(f"{BASE}:users", "alice", 5)  # wrong
    await redis.hset(f"{BASE}:users", "zed", 1)  # nobody: no records
    await redis.hdel(f"{BASE}:users", "bob")  # missing
    drifted = await audit_once(settings, redis_server.url, only=CAMPAIGN)
    assert drifted.drift
    assert failing_checks(drifted) == {
        "stock_total = available + reserved + sold",
        "available vs the ledger's last entry",
        "users whose quota differs from their records",
    }
    assert tuple(drifted.counters) == (10, 1, 2, 10)
    assert drifted.users_differing == 3
    assert sorted(drifted.user_drift) == [("alice", 5, 1), ("bob", 0, 1), ("zed", 1, 0)]
    assert await counters(redis) == (10, 1, 2, 10)  # an audit alone changes nothing

    repaired = await audit_once(settings, redis_server.url, repair=True)
    # the records win; stock_total stays; available = total - reserved - sold
    assert repaired.repaired is not None
    assert tuple(repaired.repaired) == (7, 1, 2, 10)
    assert await counters(redis) == (7, 1, 2, 10)
    quotas = as_text(await redis.hgetall(f"{BASE}:users"))
    assert quotas == {"alice": "1", "bob": "1", "dave": "1"}
    last = (await ledger(redis, CAMPAIGN))[-1]
    assert (last["op"], last["before"], last["after"]) == ("repair", "10/1/2/10", "7/1/2/10")
    assert last["by"].startswith("reconcile@")

    after = await audit_once(settings, redis_server.url)
    assert not after.drift, after.checks()
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    # and the gateway sells by the repaired books
    assert (await gateway.buy("zed")).status == 201
    assert (await gateway.buy("alice")).status == 403


@pytest.mark.parametrize(
    ("field", "delta", "failing", "repaired"),
    [
        (
            "reserved",
            2,
            {"reserved vs reservation records", "reserved vs the ledger's last entry"},
            (7, 1, 2, 10),
        ),
        (
            "sold",
            -1,
            {"sold vs reservation records", "sold vs the ledger's last entry"},
            (7, 1, 2, 10),
        ),
        # stock_total is the operators' figure, as the ledger recorded it: repair takes it
        # from the ledger's last entry, not from the corrupted counter
        ("stock_total", 1, {"stock_total vs the ledger's last entry"}, (7, 1, 2, 10)),
    ],
)
async def test_reconcile_repairs_each_counter_by_the_records(
    gateway: Gateway,
    shop: Shop,
    redis: Redis,
    redis_server: EmbeddedRedis,
    settings_data: dict[str, Any],
    field: str,
    delta: int,
    failing: set[str],
    repaired: tuple[int, int, int, int],
) -> None:
    settings = settings_for(settings_data)
    await _mixed_campaign(gateway, shop)
    await redis.hincrby(f"{BASE}:state", field, delta)
    drifted = await audit_once(settings, redis_server.url)
    assert failing_checks(drifted) == {"stock_total = available + reserved + sold", *failing}
    done = await audit_once(settings, redis_server.url, repair=True)
    assert done.repaired is not None
    assert tuple(done.repaired) == repaired
    assert await counters(redis) == repaired
    after = await audit_once(settings, redis_server.url)
    assert not after.drift, after.checks()
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_reconcile_leaves_no_connection_open(
    redis: Redis,
    redis_server: EmbeddedRedis,
    settings_data: dict[str, Any],
) -> None:
    """Reconcile is a library call too (an operator's script, these tests): it must not
    leave sockets behind."""
    await redis.hset(
        f"{BASE}:state", mapping={"available": 10, "reserved": 0, "sold": 0, "stock_total": 10}
    )

    async def connected() -> int:
        return int((await redis.info("clients"))["connected_clients"])

    alone = await connected()  # this test's own client only
    audit = await audit_once(settings_for(settings_data), redis_server.url)
    assert tuple(audit.counters) == (10, 0, 0, 10)

    async def closed() -> bool:
        return await connected() == alone

    await wait_for(closed, within=5.0)


async def _flashgate(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def reconcile_config(
    settings_data: dict[str, Any], redis_server: EmbeddedRedis, tmp_path: Path
) -> Path:
    config: dict[str, Any] = json.loads(json.dumps(settings_data))
    config["redis"] = {"url": redis_server.url}
    path = tmp_path / "flashgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.e2e
@pytest.mark.slow
async def test_reconcile_command_exit_codes_table_and_json(
    gateway: Gateway, shop: Shop, redis: Redis, reconcile_config: Path
) -> None:
    await _mixed_campaign(gateway, shop)
    config = str(reconcile_config)

    code, out, err = await _flashgate("reconcile", "-c", config)
    assert code == 0, (out, err)
    assert "no drift: the books balance" in out

    await redis.hincrby(f"{BASE}:state", "available", 3)
    await redis.hset(f"{BASE}:users", "alice", 5)
    code, out, err = await _flashgate("reconcile", "-c", config)
    assert code == 1, (out, err)
    header = out.splitlines()[0].split()
    assert header == ["campaign", "check", "counter", "expected", "drift"]
    rows = {line for line in out.splitlines() if line.startswith(CAMPAIGN)}
    # counter, expected, drift (= counter - expected)
    assert any(
        r.startswith(CAMPAIGN)
        and "stock_total = available + reserved + sold" in r
        and r.split()[-3:] == ["10", "13", "-3"]
        for r in rows
    ), out
    assert any(
        "available vs the ledger's last entry" in r and r.split()[-3:] == ["10", "7", "3"]
        for r in rows
    ), out
    assert "user 'alice' holds 5 by the quota hash, 1 by the records" in out
    assert f"flashgate reconcile -c {config} --repair" in out

    code, out, err = await _flashgate("reconcile", "-c", config, "--json")
    assert code == 1, (out, err)
    report = json.loads(out)
    assert report["drift"] is True
    (campaign,) = report["campaigns"]
    assert (campaign["campaign_id"], campaign["drift"]) == (CAMPAIGN, True)
    assert campaign["counters"] == {"available": 10, "reserved": 1, "sold": 2, "stock_total": 10}
    assert campaign["user_drift"] == [{"user": "alice", "quota": 5, "records": 1}]
    drifting = {c["check"] for c in campaign["checks"] if c["counter"] != c["expected"]}
    assert "stock_total = available + reserved + sold" in drifting

    code, out, err = await _flashgate("reconcile", "-c", config, "--repair")
    assert code == 0, (out, err)
    assert "repaired: counters now 7 available, 1 reserved, 2 sold, 10 total" in out
    assert await counters(redis) == (7, 1, 2, 10)

    code, out, err = await _flashgate("reconcile", "-c", config)
    assert code == 0, (out, err)
    assert "no drift: the books balance" in out
    code, out, err = await _flashgate("reconcile", "-c", config, "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["drift"] is False
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.mark.e2e
@pytest.mark.slow
async def test_reconcile_command_refuses_an_unknown_campaign_and_an_embedded_redis(
    redis: Redis, reconcile_config: Path, settings_data: dict[str, Any], tmp_path: Path
) -> None:
    code, _, err = await _flashgate("reconcile", "-c", str(reconcile_config), "--campaign", "nope")
    assert code == 2
    assert "no campaign 'nope'" in err
    embedded = tmp_path / "embedded.yaml"
    embedded.write_text(yaml.safe_dump({**settings_data, "redis": {"url": "embedded"}}))
    code, _, err = await _flashgate("reconcile", "-c", str(embedded))
    assert code == 2
    assert "redis.url" in err
