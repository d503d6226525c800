"""due.lua and hand_over.lua: reservations that fall due by Redis's clock, the sweeper
that expires or queues them, and the hand-over of a queued order.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from gateway.core.sweeper import sweep
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.records import Figures, ReserveStatus, State
from limiter.reserving import undo
from limiter.store import CampaignStore, StorePolicy
from tests.helpers import check_invariant, ledger, wait_for
from tests.scripts_rig import (
    CAMPAIGN,
    Rig,
    alice_reserved,
    attempt,
    deadlines,
    decide,
    ops,
    record,
    redis_ms,
    reserved,
    reserved_with_order,
    until_due,
    users,
)

pytestmark = pytest.mark.integration


async def test_reservations_fall_due_by_redis_clock_and_expire_once(rig: Rig, redis: Redis) -> None:
    short = rig.store(reserve_deadline_ms=50)
    patient = rig.store(reserve_deadline_ms=600_000)  # same campaign, longer deadline
    await short.init(10)
    lasting = await reserved(patient, "zed")
    expiring = [await reserved(short, f"user-{i}") for i in range(3)]
    sold = await reserved(short, "sold")
    await short.commit(sold, target=State.COMMITTED)
    unpaid = await reserved(patient, "unpaid")
    await patient.commit(unpaid, target=State.HELD, hold_ms=50)

    async def all_due() -> bool:
        return len(await short.due(1000)) == 4

    await wait_for(all_due)
    due = await short.due(1000)
    assert set(due) == {*expiring, unpaid}
    now = await redis_ms(redis)
    for rid in due:
        assert int((await record(redis, short, rid))["deadline_ms"]) <= now
    assert await short.due(2) == due[:2]  # the limit is honoured, oldest first

    assert await sweep(short, "sweeper@test") == 4
    assert await sweep(short, "sweeper@test") == 0
    for rid in due:
        fields = await record(redis, short, rid)
        assert (fields["state"], fields["reason"]) == ("expired", "deadline passed")
    assert (await record(redis, short, lasting))["state"] == "reserved"
    assert (await record(redis, short, sold))["state"] == "committed"
    assert await short.figures() == Figures(8, 1, 1, 10)
    assert list(await deadlines(redis, short)) == [lasting]
    expired = [e for e in await ledger(redis, CAMPAIGN) if e["op"] == "expired"]
    assert sorted(e["rid"] for e in expired) == sorted(due)
    assert {e["by"] for e in expired} == {"sweeper@test"}
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_concurrent_sweeps_expire_each_reservation_once(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=1, reserve_deadline_ms=50)
    await store.init(250)
    batch = [attempt(f"user-{i}") for i in range(200)]
    decisions = await store.reserve(batch)
    assert {d.status for d in decisions} == {ReserveStatus.RESERVED}

    async def all_due() -> bool:
        return len(await store.due(1000)) == 200

    await wait_for(all_due)
    counts = await asyncio.gather(*(sweep(store, f"sweeper-{i}") for i in range(5)))
    assert sum(counts) == 200
    assert await store.figures() == Figures(250, 0, 0, 250)
    assert await deadlines(redis, store) == {}
    assert await users(redis, store) == {}
    expired = [e["rid"] for e in await ledger(redis, CAMPAIGN) if e["op"] == "expired"]
    assert sorted(expired) == sorted(a.reservation_id for a in batch)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_an_unsettled_reservation_with_its_order_is_queued_for_redelivery_once(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store(reserve_deadline_ms=50)
    await store.init(10)
    with_order = attempt("alice")._replace(payload=b'{"method":"POST","path":"/buy"}')
    assert (await decide(store, with_order)).status is ReserveStatus.RESERVED
    forwarded = with_order.reservation_id
    never_sent = await reserved(store, "bob")  # no order kept: nothing to deliver

    async def both_due() -> bool:
        return len(await store.due()) == 2

    await wait_for(both_due)
    counts = await asyncio.gather(*(sweep(store, f"sweeper-{i}") for i in range(3)))
    assert sum(counts) == 2
    assert await sweep(store, "sweeper-x") == 0

    fields = await record(redis, store, forwarded)
    assert (fields["state"], fields["mode"], fields["deadline_ms"]) == (
        "reserved",
        "redelivery",
        "0",
    )
    ((_, order),) = await redis.xrange(store.keys.orders) or []
    assert order == {b"rid": forwarded.encode(), b"payload": b'{"method":"POST","path":"/buy"}'}
    assert (await record(redis, store, never_sent))["state"] == "expired"
    assert await store.figures() == Figures(9, 1, 0, 10)  # only the backend can settle it
    assert await deadlines(redis, store) == {}
    (redeliver,) = [e for e in await ledger(redis, CAMPAIGN) if e["op"] == "redeliver"]
    assert (redeliver["rid"], redeliver["why"]) == (
        forwarded,
        "unsettled at its deadline: asking the backend again",
    )
    assert redeliver["before"] == redeliver["after"]  # nothing moves until the backend answers
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_queued_order_is_handed_over_once_and_only_while_reserved(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store(mode="queue", reserve_deadline_ms=60_000)
    await store.init(10)
    told_202 = await reserved_with_order(store, "alice", b"order-a")
    told_503 = await reserved_with_order(store, "bob", b"order-b")
    assert await store.hand_over(told_202) is True
    assert await store.hand_over(told_202) is False  # once
    assert (await record(redis, store, told_202))["deadline_ms"] == "0"
    await undo(store, [told_503], "gateway")  # the undo came first: never handed over
    assert await store.hand_over(told_503) is False
    assert (await record(redis, store, told_503))["state"] == "released"
    assert await store.hand_over(new_reservation_id(CAMPAIGN)) is False
    orders = await redis.xrange(store.keys.orders) or []
    assert [fields for _, fields in orders] == [{b"rid": told_202.encode(), b"payload": b"order-a"}]
    assert await deadlines(redis, store) == {}
    assert await store.figures() == Figures(9, 1, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_an_undo_leaves_a_handed_over_order_to_its_delivery(rig: Rig, redis: Redis) -> None:
    """A retry was told 202 (replayed) and handed the order over before the first
    request's undo arrived: the undo must not give back what is being delivered."""
    store, rid = await alice_reserved(rig, "queue", 60_000)
    assert await store.hand_over(rid) is True
    await undo(store, [rid], "gateway")
    assert (await record(redis, store, rid))["state"] == "reserved"
    assert await store.figures() == Figures(9, 1, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_the_sweeper_hands_over_an_order_whose_gateway_died(rig: Rig, redis: Redis) -> None:
    store, rid = await alice_reserved(rig, "queue", 50)
    await until_due(store, rid)
    counts = await asyncio.gather(*(sweep(store, f"sweeper-{i}") for i in range(3)))
    assert sum(counts) == 1
    fields = await record(redis, store, rid)
    assert (fields["state"], fields["mode"], fields["deadline_ms"]) == ("reserved", "queue", "0")
    orders = await redis.xrange(store.keys.orders) or []
    assert [fields for _, fields in orders] == [{b"rid": rid.encode(), b"payload": b"order"}]
    assert await store.hand_over(rid) is False  # a gateway coming back late adds nothing
    assert await store.figures() == Figures(9, 1, 0, 10)
    assert (await ops(redis))[-1] == "hand-over"
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_a_late_undo_still_gives_back_what_a_sweeper_queued(
    rig: Rig, redis: Redis, mode: str
) -> None:
    """Its gateway was cut off past the deadline; the sweeper queued the kept order; the
    buyer was told 503 and nobody told it 202: the undo, late, still gives it back (a
    delivery under way then finds it released)."""
    store, rid = await alice_reserved(rig, mode, 50)
    await until_due(store, rid)
    assert await sweep(store, "sweeper") == 1
    await undo(store, [rid], "gateway")
    assert (await record(redis, store, rid))["state"] == "released"
    assert await store.figures() == Figures(10, 0, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_only_a_queue_order_waiting_for_it_is_handed_over(rig: Rig, redis: Redis) -> None:
    sync_store = rig.store(mode="sync", reserve_deadline_ms=60_000)
    await sync_store.init(10)
    forwarded = await reserved_with_order(sync_store, "alice")
    assert await sync_store.hand_over(forwarded) is False  # the gateway forwards it itself
    assert await redis.xlen(sync_store.keys.orders) == 0


class RacingStore(CampaignStore):
    """A real store in which the backend accepts (holds) each due reservation between
    the sweeper's due() and its release(): the race release.lua's own check settles."""

    async def due(self, limit: int = 100) -> list[str]:
        ids = await super().due(limit)
        for reservation_id in ids:
            await self.commit(reservation_id, target=State.HELD, hold_ms=600_000)
        return ids


async def test_the_sweeper_rechecks_the_deadline_atomically(rig: Rig, redis: Redis) -> None:
    policy = StorePolicy(per_user_limit=2, reserve_deadline_ms=50, ledger_max_length=1000)
    store = RacingStore(rig.pipe, rig.scripts, CampaignKeys(CAMPAIGN), policy)
    await store.init(10)
    rid = await reserved(store, "alice")

    async def is_due() -> bool:
        return await CampaignStore.due(store) == [rid]

    await wait_for(is_due)
    assert await sweep(store, "sweeper@test") == 0
    assert (await record(redis, store, rid))["state"] == "held"
    assert await store.figures() == Figures(9, 1, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
