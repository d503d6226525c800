"""release.lua: giving back stock, quota and the idempotency key (release, expiry,
cancel), dead letters, tombstones, and the restock notice.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from limiter.keys import new_reservation_id
from limiter.records import (
    CommitStatus,
    Decision,
    Figures,
    ReleaseStatus,
    ReserveStatus,
    State,
    Transition,
)
from tests.helpers import check_invariant, ledger, redis_snapshot
from tests.scripts_rig import (
    ACTOR,
    CAMPAIGN,
    Rig,
    attempt,
    deadlines,
    decide,
    listening,
    notices,
    ops,
    record,
    release,
    reserved,
    users,
)

pytestmark = pytest.mark.integration


async def test_release_gives_back_stock_quota_and_the_idempotency_key(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store(reserve_deadline_ms=60_000)
    await store.init(10)
    rid = await reserved(store, "alice", 2, key="k-1")
    assert await release(store, rid) == Transition(ReleaseStatus.RELEASED, "released")

    assert await store.figures() == Figures(10, 0, 0, 10)
    assert await users(redis, store) == {}
    assert await redis.hgetall(store.keys.idempotency) == {}
    assert await deadlines(redis, store) == {}
    fields = await record(redis, store, rid)
    assert (fields["state"], fields["reason"]) == ("released", "backend refused")
    assert int(fields["updated_ms"]) >= int(fields["created_ms"])
    entry = (await ledger(redis, CAMPAIGN))[-1]
    assert entry == {
        "op": "released",
        "rid": rid,
        "user": "alice",
        "qty": "2",
        "by": ACTOR,
        "before": "8/2/0/10",
        "after": "10/0/0/10",
        "why": "backend refused",
    }

    # once only
    assert await release(store, rid) == Transition(ReleaseStatus.ALREADY, "released")
    assert await store.figures() == Figures(10, 0, 0, 10)
    # the key is free: a new attempt with it reserves afresh
    fresh = attempt("alice", 1, key="k-1")
    assert await decide(store, fresh) == Decision(ReserveStatus.RESERVED, fresh.reservation_id, 9)
    assert fresh.reservation_id != rid
    assert await ops(redis) == ["init", "reserve", "released", "reserve"]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_release_can_keep_a_dead_letter(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice")
    assert await store.count_attempt(rid) == 1
    assert await store.count_attempt(rid) == 2
    result = await store.release(
        rid,
        leavable=(State.RESERVED,),
        target=State.RELEASED,
        reason="backend kept failing",
        actor=ACTOR,
        dead_letter=b"order \xff\x00",
    )
    assert result == Transition(ReleaseStatus.RELEASED, "released")
    ((_, letter),) = await redis.xrange(store.keys.dead_letters) or []
    assert letter == {
        b"rid": rid.encode(),
        b"reason": b"backend kept failing",
        b"attempts": b"2",
        b"payload": b"order \xff\x00",
    }
    assert await store.figures() == Figures(10, 0, 0, 10)
    # without a dead letter, nothing goes to the stream
    await release(store, await reserved(store, "bob"))
    assert len(await redis.xrange(store.keys.dead_letters) or []) == 1
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_release_refusals(rig: Rig, redis: Redis) -> None:
    store = rig.store(reserve_deadline_ms=60_000)
    await store.init(10)
    rid = await reserved(store, "alice")
    before = await redis_snapshot(redis)

    assert await release(store, rid, leavable=(State.HELD,)) == Transition(
        ReleaseStatus.NOT_ALLOWED, "reserved"
    )
    assert await release(store, new_reservation_id(CAMPAIGN)) == Transition(
        ReleaseStatus.NOT_FOUND, ""
    )
    assert await release(store, rid, only_when_due=True) == Transition(
        ReleaseStatus.NOT_DUE, "reserved"
    )
    # a sweep that may not touch this state leaves its deadline alone
    assert await release(store, rid, leavable=(State.HELD,), only_when_due=True) == Transition(
        ReleaseStatus.NOT_ALLOWED, "reserved"
    )
    assert await redis_snapshot(redis) == before
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_an_undone_reserve_that_arrives_late_reserves_nothing(rig: Rig, redis: Redis) -> None:
    """The undo of a reserve call whose reply was lost can reach Redis before the call
    itself (another connection): its tombstone makes the late call a no-op."""
    store = rig.store()
    await store.init(10)
    late = attempt("alice")
    undone = await store.release(
        late.reservation_id,
        leavable=(State.RESERVED,),
        target=State.RELEASED,
        reason="its requester never learnt the outcome",
        actor=ACTOR,
        tombstone=True,
    )
    assert undone == Transition(ReleaseStatus.NOT_FOUND, "")
    decision = await decide(store, late)
    assert decision.status is not ReserveStatus.RESERVED
    assert await store.figures() == Figures(10, 0, 0, 10)
    assert await users(redis, store) == {}
    assert 0 < await redis.pttl(store.keys.reservation(late.reservation_id)) <= 86_400_000
    # a commit or confirm of that id (a confused backend) finds nothing sold
    for target in (State.COMMITTED, State.HELD):
        committed = await store.commit(
            late.reservation_id, target=target, hold_ms=1000, retake=True
        )
        assert committed == Transition(CommitStatus.GONE, "released")
    assert await store.figures() == Figures(10, 0, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_reservation_without_deadline_is_never_due(rig: Rig, redis: Redis) -> None:
    store = rig.store(reserve_deadline_ms=0)
    await store.init(10)
    rid = await reserved(store, "alice")
    assert await release(store, rid, only_when_due=True) == Transition(
        ReleaseStatus.NOT_DUE, "reserved"
    )
    assert await store.figures() == Figures(9, 1, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_cancelling_a_sale_returns_its_units_once(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice", 2)
    assert await store.commit(rid, target=State.COMMITTED) == Transition(
        CommitStatus.DONE, "committed"
    )
    assert await store.figures() == Figures(8, 0, 2, 10)
    # a committed sale is not released by default
    assert (await release(store, rid)).status is ReleaseStatus.NOT_ALLOWED

    every = (State.RESERVED, State.HELD, State.COMMITTED)
    assert await release(store, rid, leavable=every, target=State.CANCELLED) == Transition(
        ReleaseStatus.RELEASED, "cancelled"
    )
    assert await store.figures() == Figures(10, 0, 0, 10)
    assert await release(store, rid, leavable=every, target=State.CANCELLED) == Transition(
        ReleaseStatus.ALREADY, "cancelled"
    )
    assert await store.figures() == Figures(10, 0, 0, 10)
    assert await users(redis, store) == {}
    entry = (await ledger(redis, CAMPAIGN))[-1]
    assert (entry["op"], entry["before"], entry["after"]) == ("cancelled", "8/0/2/10", "10/0/0/10")
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_release_of_a_held_reservation(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice")
    await store.commit(rid, target=State.HELD, hold_ms=60_000)
    assert await release(store, rid, leavable=(State.RESERVED, State.HELD)) == Transition(
        ReleaseStatus.RELEASED, "released"
    )
    assert await store.figures() == Figures(10, 0, 0, 10)
    assert await deadlines(redis, store) == {}
    typed = await store.reservation(rid)
    assert typed is not None
    assert typed.deadline_ms == 0  # no deadline left to show
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_restock_is_published_when_stock_comes_back(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(2)
    channel = store.keys.events
    async with listening(redis, channel) as pubsub:
        first = await reserved(store, "alice")
        second = await reserved(store, "bob")
        assert await notices(redis, pubsub, channel) == [b"sold-out"]
        await release(store, first)
        assert await notices(redis, pubsub, channel) == [b"restock"]
        await release(store, second)  # 1 -> 2: not a restock
        assert await notices(redis, pubsub, channel) == []
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
