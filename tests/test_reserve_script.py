"""reserve.lua: the atomic deduction (stock, the per-user limit, idempotency keys, the
record, its deadline and kept order) and its sold-out notice; a crowd through the
reserve batcher.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import asyncio
import collections
import random

import pytest
from redis.asyncio import Redis

from limiter.errors import CampaignMissing, StorageError
from limiter.keys import idempotency_field, new_reservation_id
from limiter.records import Attempt, Decision, Figures, ReserveStatus, State
from tests.helpers import as_text, check_invariant, ledger, redis_snapshot
from tests.scripts_rig import (
    CAMPAIGN,
    RECORD_FIELDS,
    Rig,
    attempt,
    deadlines,
    decide,
    evalsha_calls,
    listening,
    notices,
    ops,
    record,
    redis_ms,
    reserve_batcher,
    reserved,
    users,
)

pytestmark = pytest.mark.integration


async def test_reserve_creates_record_quota_index_and_ledger(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    one = attempt("alice", 2)
    assert await store.reserve([one]) == [Decision(ReserveStatus.RESERVED, one.reservation_id, 8)]

    fields = await record(redis, store, one.reservation_id)
    assert set(fields) == RECORD_FIELDS
    assert (fields["user"], fields["qty"], fields["state"], fields["mode"]) == (
        "alice",
        "2",
        "reserved",
        "sync",
    )
    assert (fields["idem"], fields["deadline_ms"], fields["attempts"]) == ("", "0", "0")
    assert int(fields["created_ms"]) == int(fields["updated_ms"]) > 0
    assert await deadlines(redis, store) == {}  # reserve_deadline_ms 0: no deadline
    assert await redis.zrange(store.keys.index, 0, -1) == [one.reservation_id.encode()]
    assert await users(redis, store) == {"alice": 2}
    assert not await redis.exists(store.keys.orders)  # sync mode queues nothing

    typed = await store.reservation(one.reservation_id)
    assert typed is not None
    assert (typed.user_id, typed.quantity, typed.state, typed.deadline_ms) == (
        "alice",
        2,
        State.RESERVED,
        0,
    )
    assert (typed.campaign_id, typed.reply, typed.conflict) == (CAMPAIGN, None, False)
    assert await store.reservation(new_reservation_id(CAMPAIGN)) is None

    entry = (await ledger(redis, CAMPAIGN))[-1]
    assert entry == {
        "op": "reserve",
        "rid": one.reservation_id,
        "user": "alice",
        "qty": "2",
        "by": "gateway",
        "before": "10/0/0/10",
        "after": "8/2/0/10",
    }
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_reserve_sets_a_deadline_by_redis_clock(rig: Rig, redis: Redis) -> None:
    store = rig.store(reserve_deadline_ms=60_000)
    await store.init(10)
    before = await redis_ms(redis)
    rid = await reserved(store, "alice")
    after = await redis_ms(redis)

    fields = await record(redis, store, rid)
    deadline = int(fields["deadline_ms"])
    assert deadline == int(fields["created_ms"]) + 60_000
    assert before + 60_000 <= deadline <= after + 60_000
    assert await deadlines(redis, store) == {rid: deadline}
    typed = await store.reservation(rid)
    assert typed is not None
    assert typed.deadline_ms == deadline
    assert await store.due() == []
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_reserve_in_queue_mode_keeps_the_order_until_it_is_handed_over(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store(mode="queue", reserve_deadline_ms=60_000)
    await store.init(10)
    one = Attempt(new_reservation_id(CAMPAIGN), "alice", 1, "", b'{"quantity": 1}\xff')
    assert (await decide(store, one)).status is ReserveStatus.RESERVED
    assert await redis.xlen(store.keys.orders) == 0  # nobody may deliver it yet
    kept = await redis.hgetall(store.keys.reservation(one.reservation_id))
    assert (kept[b"mode"], kept[b"payload"]) == (b"queue", b'{"quantity": 1}\xff')
    assert await store.hand_over(one.reservation_id) is True  # the buyer is told 202
    ((_, order),) = await redis.xrange(store.keys.orders) or []
    assert order == {b"rid": one.reservation_id.encode(), b"payload": b'{"quantity": 1}\xff'}
    assert not await redis.hexists(store.keys.reservation(one.reservation_id), "payload")
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_idempotency_key_answers_duplicate_with_the_earlier_id(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)
    first = attempt("alice", key="k-1")
    second = attempt("alice", key="k-1")  # a new request, same key
    assert await decide(store, first) == Decision(ReserveStatus.RESERVED, first.reservation_id, 9)
    assert await decide(store, second) == Decision(ReserveStatus.DUPLICATE, first.reservation_id, 9)
    assert not await redis.exists(store.keys.reservation(second.reservation_id))
    assert as_text(await redis.hgetall(store.keys.idempotency)) == {
        idempotency_field("alice", "k-1"): first.reservation_id
    }
    assert (await record(redis, store, first.reservation_id))["idem"] == first.idempotency_field

    # the same key is another user's own key: it does not collide
    other = attempt("bob", key="k-1")
    assert (await decide(store, other)).status is ReserveStatus.RESERVED
    # two attempts with one key in one batch: the second is the duplicate of the first
    third, fourth = attempt("carol", key="k-2"), attempt("carol", key="k-2")
    assert await store.reserve([third, fourth]) == [
        Decision(ReserveStatus.RESERVED, third.reservation_id, 7),
        Decision(ReserveStatus.DUPLICATE, third.reservation_id, 7),
    ]
    assert await store.figures() == Figures(7, 3, 0, 10)
    assert (await ops(redis)).count("reserve") == 3
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_sold_out_and_insufficient(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=5)
    await store.init(3)
    await reserved(store, "alice", 2)
    short = attempt("bob", 2)
    assert await decide(store, short) == Decision(
        ReserveStatus.INSUFFICIENT, short.reservation_id, 1
    )
    await reserved(store, "bob", 1)
    late = attempt("carol", 1)
    assert await decide(store, late) == Decision(ReserveStatus.SOLD_OUT, late.reservation_id, 0)
    for refused in (short, late):
        assert not await redis.exists(store.keys.reservation(refused.reservation_id))
    assert await store.figures() == Figures(0, 3, 0, 3)
    assert await users(redis, store) == {"alice": 2, "bob": 1}
    assert await ops(redis) == ["init", "reserve", "reserve"]
    await check_invariant(redis, CAMPAIGN, per_user_limit=5)


async def test_limit_counts_units_not_attempts(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=2)
    await store.init(10)
    await reserved(store, "alice", 2)
    over = attempt("alice", 1)
    assert await decide(store, over) == Decision(
        ReserveStatus.LIMIT_EXCEEDED, over.reservation_id, 2
    )
    await reserved(store, "bob", 1)
    too_many = attempt("bob", 2)
    assert await decide(store, too_many) == Decision(
        ReserveStatus.LIMIT_EXCEEDED, too_many.reservation_id, 1
    )
    await reserved(store, "bob", 1)
    assert await users(redis, store) == {"alice": 2, "bob": 2}
    assert await store.figures() == Figures(6, 4, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_limit_is_checked_before_stock(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=1)
    await store.init(1)
    await reserved(store, "alice")
    again = attempt("alice")
    assert await decide(store, again) == Decision(
        ReserveStatus.LIMIT_EXCEEDED, again.reservation_id, 1
    )
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_no_campaign_changes_nothing(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    batch = [attempt("alice"), attempt("bob", 2, key="k")]
    assert await store.reserve(batch) == [
        Decision(ReserveStatus.NO_CAMPAIGN, a.reservation_id, 0) for a in batch
    ]
    assert await redis_snapshot(redis) == {}
    with pytest.raises(CampaignMissing):
        await store.figures()


async def test_a_batch_is_decided_in_order_in_one_script_call(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=2)
    await rig.pipe.load_scripts(rig.scripts.all())
    await store.init(5)
    batch = [
        attempt("alice", 1),
        attempt("bob", 2),
        attempt("alice", 1),
        attempt("alice", 1),  # alice holds 2 now
        attempt("carol", 2),  # 1 left
        attempt("dave", 1),  # takes the last unit
        attempt("erin", 1),
    ]
    calls = await evalsha_calls(redis)
    decisions = await store.reserve(batch)
    assert await evalsha_calls(redis) - calls == 1
    assert await store.decided() == len(batch)  # the admission budget's account
    assert [(d.status, d.figure) for d in decisions] == [
        (ReserveStatus.RESERVED, 4),
        (ReserveStatus.RESERVED, 2),
        (ReserveStatus.RESERVED, 1),
        (ReserveStatus.LIMIT_EXCEEDED, 2),
        (ReserveStatus.INSUFFICIENT, 1),
        (ReserveStatus.RESERVED, 0),
        (ReserveStatus.SOLD_OUT, 0),
    ]
    assert [d.reservation_id for d in decisions] == [a.reservation_id for a in batch]
    assert await store.figures() == Figures(0, 5, 0, 5)
    assert await users(redis, store) == {"alice": 2, "bob": 2, "dave": 1}

    entries = [e for e in await ledger(redis, CAMPAIGN) if e["op"] == "reserve"]
    assert [e["rid"] for e in entries] == [batch[i].reservation_id for i in (0, 1, 2, 5)]
    assert [(e["before"], e["after"]) for e in entries] == [
        ("5/0/0/5", "4/1/0/5"),
        ("4/1/0/5", "2/3/0/5"),
        ("2/3/0/5", "1/4/0/5"),
        ("1/4/0/5", "0/5/0/5"),
    ]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_the_same_attempt_twice_deducts_once(rig: Rig, redis: Redis) -> None:
    """redis-py may send a call again after a lost reply: the record makes it harmless."""
    store = rig.store()
    await store.init(10)
    one = attempt("alice", 2)
    assert await store.reserve([one, one]) == [
        Decision(ReserveStatus.RESERVED, one.reservation_id, 8),
        Decision(ReserveStatus.RESERVED, one.reservation_id, 8),
    ]
    assert await store.reserve([one]) == [Decision(ReserveStatus.RESERVED, one.reservation_id, 8)]
    assert await store.figures() == Figures(8, 2, 0, 10)
    assert await users(redis, store) == {"alice": 2}
    assert await ops(redis) == ["init", "reserve"]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


@pytest.mark.parametrize("bad_quantity", [0, -1])
async def test_a_batch_with_an_invalid_quantity_is_refused_whole(
    rig: Rig, redis: Redis, bad_quantity: int
) -> None:
    store = rig.store()
    await store.init(10)
    await reserved(store, "alice")
    before = await redis_snapshot(redis)
    with pytest.raises(StorageError, match="quantity must be a positive integer"):
        await store.reserve([attempt("bob"), attempt("carol", bad_quantity), attempt("dave")])
    assert await redis_snapshot(redis) == before
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_sold_out_is_published_exactly_when_available_reaches_zero(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store(per_user_limit=3)
    await store.init(3)
    channel = store.keys.events
    async with listening(redis, channel) as pubsub:
        await reserved(store, "alice")
        assert await notices(redis, pubsub, channel) == []
        # a batch that sells out in its middle announces once, after the batch
        decisions = await store.reserve([attempt("bob", 2), attempt("carol"), attempt("dave")])
        assert [d.status for d in decisions] == [
            ReserveStatus.RESERVED,
            ReserveStatus.SOLD_OUT,
            ReserveStatus.SOLD_OUT,
        ]
        assert await notices(redis, pubsub, channel) == [b"sold-out"]
        await decide(store, attempt("erin"))  # sold out already: no new notice
        assert await notices(redis, pubsub, channel) == []
    await check_invariant(redis, CAMPAIGN, per_user_limit=3)


async def test_a_crowd_through_the_batcher_gets_exactly_the_stock(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=2)
    await rig.pipe.load_scripts(rig.scripts.all())
    await store.init(100)
    batcher = reserve_batcher(store)
    rng = random.Random(7)
    crowd = [attempt(f"user-{rng.randrange(500)}", rng.choice([1, 2])) for _ in range(2000)]
    calls = await evalsha_calls(redis)
    decisions = await asyncio.gather(*(batcher.submit(a) for a in crowd))
    await batcher.close()

    won: collections.Counter[str] = collections.Counter()
    for one, decision in zip(crowd, decisions, strict=True):
        assert decision.reservation_id == one.reservation_id
        if decision.status is ReserveStatus.RESERVED:
            won[one.user_id] += one.quantity
    assert sum(won.values()) == 100
    assert max(won.values()) <= 2
    assert {d.status for d in decisions} <= {
        ReserveStatus.RESERVED,
        ReserveStatus.SOLD_OUT,
        ReserveStatus.INSUFFICIENT,
        ReserveStatus.LIMIT_EXCEEDED,
    }
    assert await users(redis, store) == dict(won)
    assert await store.figures() == Figures(0, 100, 0, 100)
    assert batcher.items == 2000
    assert 0 < batcher.calls < 2000
    assert await evalsha_calls(redis) - calls == batcher.calls
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
