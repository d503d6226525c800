"""The Lua scripts, through their typed wrappers, against a real Redis.

Each scenario asserts the exact outcome (statuses, figures, records, ledger entries,
notices) and then ``check_invariant``, which reads Redis directly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.core.sweeper import sweep
from gateway.embedded.server import EmbeddedRedis, free_port
from limiter.audit import audit
from limiter.batching import TickBatcher
from limiter.errors import CampaignMissing, StorageError
from limiter.guard import RedisGuard
from limiter.keys import CampaignKeys, idempotency_field, new_reservation_id
from limiter.pipeline import AutoPipeline
from limiter.records import (
    AdjustStatus,
    Attempt,
    CommitStatus,
    Decision,
    Figures,
    ReleaseStatus,
    Reply,
    ReserveStatus,
    State,
    Transition,
)
from limiter.reserving import Unclaimed, release_unclaimed, undo
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from tests.helpers import (
    as_text,
    auto_pipeline,
    check_invariant,
    ledger,
    redis_snapshot,
    text,
    wait_for,
)

pytestmark = pytest.mark.integration

CAMPAIGN = "c1"
ACTOR = "tester"
SENTINEL = b"-- sentinel --"
RECORD_FIELDS = {
    "user",
    "qty",
    "state",
    "mode",
    "idem",
    "created_ms",
    "updated_ms",
    "deadline_ms",
    "attempts",
}


class Rig:
    """What gateway/runtime.py builds: one client, its scripts, one auto-pipeline."""

    def __init__(self, client: Redis, scripts: Scripts, pipe: AutoPipeline) -> None:
        self.client = client
        self.scripts = scripts
        self.pipe = pipe

    def store(
        self,
        *,
        per_user_limit: int = 2,
        reserve_deadline_ms: int = 0,
        campaign: str = CAMPAIGN,
        mode: str = "sync",
    ) -> CampaignStore:
        policy = StorePolicy(
            per_user_limit=per_user_limit,
            reserve_deadline_ms=reserve_deadline_ms,
            ledger_max_length=1000,
            mode=mode,
        )
        return CampaignStore(self.pipe, self.scripts, CampaignKeys(campaign), policy)


@contextlib.asynccontextmanager
async def open_rig(url: str) -> AsyncIterator[Rig]:
    async with auto_pipeline(url, 1.0) as pipe:
        yield Rig(pipe.redis, Scripts.register(pipe.redis), pipe)


@pytest.fixture
async def rig(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[Rig]:
    """Depends on ``redis`` so that Redis is empty (and its script cache too)."""
    async with open_rig(redis_server.url) as built:
        yield built


def reserve_batcher(
    store: CampaignStore, unclaimed: Unclaimed | None = None
) -> TickBatcher[Attempt, Decision]:
    """The reserve batcher, wired as gateway/runtime.py wires it."""
    return TickBatcher(
        store.pipe.guard, store.submit_reserve, store.decisions, "reserve", unclaimed=unclaimed
    )


def releasing_winners(store: CampaignStore, seen: list[tuple[Attempt, Decision]]) -> Unclaimed:
    """The runtime's ``unclaimed`` handler, noting what it was handed."""

    release = release_unclaimed(store, ACTOR)

    def unclaimed(one: Attempt, decision: Decision) -> Awaitable[object] | None:
        seen.append((one, decision))
        return release(one, decision)

    return unclaimed


def attempt(user: str, quantity: int = 1, key: str = "") -> Attempt:
    field = idempotency_field(user, key) if key else ""
    return Attempt(new_reservation_id(CAMPAIGN), user, quantity, field)


async def decide(store: CampaignStore, one: Attempt) -> Decision:
    (decision,) = await store.reserve([one])
    return decision


async def reserved(store: CampaignStore, user: str, quantity: int = 1, key: str = "") -> str:
    """Reserve and insist that it worked; returns the reservation id."""
    one = attempt(user, quantity, key)
    decision = await decide(store, one)
    assert decision.status is ReserveStatus.RESERVED, decision
    return one.reservation_id


async def reserved_with_order(store: CampaignStore, user: str, order: bytes = b"order") -> str:
    """Reserve, keeping ``order`` on the record as the gateway does; the reservation id."""
    decision = await decide(store, attempt(user)._replace(payload=order))
    assert decision.status is ReserveStatus.RESERVED, decision
    return decision.reservation_id


async def alice_reserved(
    rig: Rig, mode: str, reserve_deadline_ms: int
) -> tuple[CampaignStore, str]:
    """A store with stock 10 in which alice holds a reservation with its order."""
    store = rig.store(mode=mode, reserve_deadline_ms=reserve_deadline_ms)
    await store.init(10)
    return store, await reserved_with_order(store, "alice")


async def until_due(store: CampaignStore, reservation_id: str) -> None:
    async def is_due() -> bool:
        return await store.due() == [reservation_id]

    await wait_for(is_due)


async def release(
    store: CampaignStore,
    reservation_id: str,
    *,
    leavable: Sequence[State] = (State.RESERVED,),
    target: State = State.RELEASED,
    only_when_due: bool = False,
) -> Transition:
    return await store.release(
        reservation_id,
        leavable=leavable,
        target=target,
        reason="backend refused",
        actor=ACTOR,
        only_when_due=only_when_due,
    )


async def record(redis: Redis, store: CampaignStore, reservation_id: str) -> dict[str, str]:
    return as_text(await redis.hgetall(store.keys.reservation(reservation_id)))


async def users(redis: Redis, store: CampaignStore) -> dict[str, int]:
    return {k: int(v) for k, v in as_text(await redis.hgetall(store.keys.users)).items()}


async def deadlines(redis: Redis, store: CampaignStore) -> dict[str, int]:
    entries = await redis.zrange(store.keys.deadlines, 0, -1, withscores=True)
    return {text(member): int(score) for member, score in cast(list[tuple[bytes, float]], entries)}


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    entry: dict[str, Any] = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0))


async def ops(redis: Redis) -> list[str]:
    return [entry["op"] for entry in await ledger(redis, CAMPAIGN)]


@contextlib.asynccontextmanager
async def listening(redis: Redis, channel: str) -> AsyncIterator[PubSub]:
    """A subscription that Redis has confirmed (so no later notice can be missed)."""
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(channel)
        async with asyncio.timeout(5):
            while await pubsub.get_message(timeout=1.0) is None:
                pass
        yield pubsub


async def notices(redis: Redis, pubsub: PubSub, channel: str) -> list[bytes]:
    """Every notice published so far: publishes a sentinel and reads up to it (in order)."""
    await redis.publish(channel, SENTINEL)
    seen: list[bytes] = []
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            if message["data"] == SENTINEL:
                return seen
            seen.append(message["data"])


# --------------------------------------------------------------------------- init


async def test_init_creates_once_and_a_restart_keeps_the_stock(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    assert await store.init(10, actor="config@a") == (True, Figures(10, 0, 0, 10))
    assert await store.init(99, actor="config@b") == (False, Figures(10, 0, 0, 10))
    await reserved(store, "alice")
    assert await store.init(50, actor="config@c") == (False, Figures(9, 1, 0, 10))
    assert await store.figures() == Figures(9, 1, 0, 10)

    (init, reserve) = await ledger(redis, CAMPAIGN)
    assert init == {
        "op": "init",
        "rid": "",
        "user": "",
        "qty": "10",
        "by": "config@a",
        "before": "0/0/0/0",
        "after": "10/0/0/10",
    }
    assert reserve["op"] == "reserve"
    assert int(await redis.hget(store.keys.state, "created_ms") or 0) > 0
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


# --------------------------------------------------------------------------- reserve


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
    await rig.scripts.load(rig.client)
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


# --------------------------------------------------------------------------- release


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


# --------------------------------------------------------------------------- commit


async def test_commit_sells_and_removes_the_deadline(rig: Rig, redis: Redis) -> None:
    store = rig.store(reserve_deadline_ms=60_000)
    await store.init(10)
    rid = await reserved(store, "alice", 2)
    assert await store.commit(rid, target=State.COMMITTED) == Transition(
        CommitStatus.DONE, "committed"
    )
    assert await store.figures() == Figures(8, 0, 2, 10)
    assert await deadlines(redis, store) == {}
    fields = await record(redis, store, rid)
    assert (fields["state"], fields["deadline_ms"]) == ("committed", "0")
    assert await users(redis, store) == {"alice": 2}  # a sale keeps its quota
    entry = (await ledger(redis, CAMPAIGN))[-1]
    assert (entry["op"], entry["by"], entry["before"], entry["after"]) == (
        "commit",
        "gateway",
        "8/2/0/10",
        "8/0/2/10",
    )
    assert await store.commit(rid, target=State.COMMITTED) == Transition(
        CommitStatus.ALREADY, "committed"
    )
    assert await store.commit(rid, target=State.HELD) == Transition(
        CommitStatus.ALREADY, "committed"
    )
    assert await store.figures() == Figures(8, 0, 2, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_hold_then_confirm(rig: Rig, redis: Redis) -> None:
    store = rig.store(reserve_deadline_ms=60_000)
    await store.init(10)
    rid = await reserved(store, "alice")
    assert await store.commit(rid, target=State.HELD, hold_ms=300_000) == Transition(
        CommitStatus.DONE, "held"
    )
    fields = await record(redis, store, rid)
    assert fields["state"] == "held"
    assert int(fields["deadline_ms"]) == int(fields["updated_ms"]) + 300_000
    assert await deadlines(redis, store) == {rid: int(fields["deadline_ms"])}
    assert await store.figures() == Figures(9, 1, 0, 10)  # held units count as reserved
    assert await store.commit(rid, target=State.HELD, hold_ms=1) == Transition(
        CommitStatus.ALREADY, "held"
    )
    assert await deadlines(redis, store) == {rid: int(fields["deadline_ms"])}

    assert await store.commit(rid, target=State.COMMITTED, leavable=State.HELD) == Transition(
        CommitStatus.DONE, "committed"
    )
    assert await store.figures() == Figures(9, 0, 1, 10)
    assert await deadlines(redis, store) == {}
    assert await ops(redis) == ["init", "reserve", "hold", "confirm"]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_commit_after_release_is_gone_without_retake(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice")
    await release(store, rid, target=State.EXPIRED)
    assert await store.commit(rid, target=State.COMMITTED) == Transition(
        CommitStatus.GONE, "expired"
    )
    assert await store.figures() == Figures(10, 0, 0, 10)
    entry = (await ledger(redis, CAMPAIGN))[-1]
    assert (entry["op"], entry["rid"], entry["before"], entry["after"]) == (
        "commit-conflict",
        rid,
        "10/0/0/10",
        "10/0/0/10",
    )
    typed = await store.reservation(rid)
    assert typed is not None
    assert (typed.state, typed.conflict) == (State.EXPIRED, True)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


@pytest.mark.parametrize(
    ("target", "op", "after"),
    [(State.COMMITTED, "late-commit", Figures(9, 0, 1, 10)), (State.HELD, "late-hold", None)],
)
async def test_commit_after_release_is_retaken_when_stock_remains(
    rig: Rig, redis: Redis, target: State, op: str, after: Figures | None
) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice")
    await release(store, rid, target=State.EXPIRED)
    assert await store.commit(rid, target=target, hold_ms=60_000, retake=True) == Transition(
        CommitStatus.RETAKEN, target.value
    )
    assert await store.figures() == (after or Figures(9, 1, 0, 10))
    assert await users(redis, store) == {"alice": 1}
    assert (await record(redis, store, rid))["state"] == target.value
    assert (await ledger(redis, CAMPAIGN))[-1]["op"] == op
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


@pytest.mark.parametrize(
    ("leavable", "target"),
    [((State.HELD,), State.EXPIRED), ((State.RESERVED,), State.CANCELLED)],
    ids=["expired-hold", "cancelled"],
)
async def test_a_late_acceptance_never_takes_back_an_expired_hold_or_a_cancel(
    rig: Rig, redis: Redis, leavable: tuple[State, ...], target: State
) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice")
    if State.HELD in leavable:
        await store.commit(rid, target=State.HELD, hold_ms=60_000)
    await release(store, rid, leavable=leavable, target=target)
    # e.g. a redelivery's duplicate 2xx after the confirm was told 409 expired
    late = await store.commit(rid, target=State.HELD, hold_ms=60_000, retake=True)
    assert late == Transition(CommitStatus.GONE, target.value)
    assert await store.figures() == Figures(10, 0, 0, 10)
    assert (await ops(redis))[-1] == "commit-conflict"
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_retaken_reservation_gets_its_idempotency_key_back(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice", key="k-1")
    await release(store, rid)  # the key is free for a fresh attempt...
    assert await redis.hgetall(store.keys.idempotency) == {}
    await store.commit(rid, target=State.COMMITTED, retake=True)  # ...until it is taken back
    retry = await decide(store, attempt("alice", key="k-1"))
    assert (retry.status, retry.reservation_id) == (ReserveStatus.DUPLICATE, rid)
    assert await users(redis, store) == {"alice": 1}
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_late_acceptance_never_retakes_once_its_key_names_a_fresh_attempt(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store(per_user_limit=2)
    await store.init(10)
    first = await reserved(store, "alice", key="k-1")
    await release(store, first)  # the backend timed out; alice retries with her key
    second = await reserved(store, "alice", key="k-1")
    assert second != first
    # the first order's acceptance arrives late: stock and quota would permit it
    late = await store.commit(first, target=State.COMMITTED, retake=True)
    assert late == Transition(CommitStatus.GONE, "released")
    field = idempotency_field("alice", "k-1")
    assert await redis.hget(store.keys.idempotency, field) == second.encode()
    assert await users(redis, store) == {"alice": 1}
    assert await store.figures() == Figures(9, 1, 0, 10)
    assert (await ops(redis))[-1] == "commit-conflict"
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_hold_that_expired_before_left_was_recorded_is_not_retaken(
    rig: Rig, redis: Redis
) -> None:
    """Records released by an older version lack 'left': a kept reply marks a hold."""
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "alice")
    await store.commit(
        rid, target=State.HELD, hold_ms=60_000, reply=Reply(200, "text/plain", b"ok")
    )
    await release(store, rid, leavable=(State.HELD,), target=State.EXPIRED)
    await redis.hdel(store.keys.reservation(rid), "left")
    late = await store.commit(rid, target=State.HELD, hold_ms=60_000, retake=True)
    assert late == Transition(CommitStatus.GONE, "expired")
    assert await store.figures() == Figures(10, 0, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_settled_reservation_keeps_no_order(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    orders = [attempt(user)._replace(payload=b'{"method":"POST"}') for user in ("alice", "bob")]
    assert [d.status for d in await store.reserve(orders)] == [ReserveStatus.RESERVED] * 2
    sold, given_back = (order.reservation_id for order in orders)
    for rid in (sold, given_back):
        assert await redis.hexists(store.keys.reservation(rid), "payload")
    await store.commit(sold, target=State.COMMITTED)
    await release(store, given_back)
    for rid in (sold, given_back):
        assert not await redis.hexists(store.keys.reservation(rid), "payload")


async def test_retake_is_gone_without_stock_or_quota(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=1)
    await store.init(1)
    no_stock = await reserved(store, "alice")
    await release(store, no_stock, target=State.EXPIRED)
    await reserved(store, "bob")  # takes the unit back
    assert await store.commit(no_stock, target=State.COMMITTED, retake=True) == Transition(
        CommitStatus.GONE, "expired"
    )
    assert await store.adjust(delta=2, actor=ACTOR) == (AdjustStatus.DONE, Figures(2, 1, 0, 3))
    no_quota = await reserved(store, "carol")
    await release(store, no_quota, target=State.EXPIRED)
    await reserved(store, "carol")  # carol's quota is used by a fresh reservation
    assert await store.figures() == Figures(1, 2, 0, 3)  # stock would permit
    assert await store.commit(no_quota, target=State.COMMITTED, retake=True) == Transition(
        CommitStatus.GONE, "expired"
    )
    assert await store.figures() == Figures(1, 2, 0, 3)
    assert await users(redis, store) == {"bob": 1, "carol": 1}
    assert (await ops(redis)).count("commit-conflict") == 2
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_commit_of_an_unknown_reservation(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    before = await redis_snapshot(redis)
    assert await store.commit(new_reservation_id(CAMPAIGN), target=State.COMMITTED) == Transition(
        CommitStatus.NOT_FOUND, ""
    )
    assert await redis_snapshot(redis) == before


async def test_the_reply_is_kept_byte_for_byte(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    await store.commit(await reserved(store, "bob"), target=State.COMMITTED)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
    rid = await reserved(store, "alice")
    body = b'{"order": "\xc3\xa9"}\x00\xff\xfe\r\n'  # not UTF-8
    reply = Reply(201, "application/json; charset=latin-1", body)
    assert (await store.commit(rid, target=State.COMMITTED, reply=reply)).status is (
        CommitStatus.DONE
    )
    typed = await store.reservation(rid)
    assert typed is not None
    assert typed.reply == reply
    assert typed.reply.body == body
    assert await redis.hget(store.keys.reservation(rid), "reply_body") == body
    # check_invariant (tests/helpers.py) decodes every record field as UTF-8, so it cannot
    # read this record; the counters are checked here instead.
    assert await store.figures() == Figures(8, 0, 2, 10)


async def test_a_commit_without_reply_keeps_none(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    rid = await reserved(store, "bob")
    empty = await reserved(store, "carol")
    await store.commit(rid, target=State.COMMITTED)
    await store.commit(empty, target=State.COMMITTED, reply=Reply(204, "", b""))
    untold = await store.reservation(rid)
    assert untold is not None
    assert untold.reply is None
    told = await store.reservation(empty)
    assert told is not None
    assert told.reply == Reply(204, "", b"")
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


# --------------------------------------------------------------------------- adjust


async def test_adjust_delta_and_set(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    await reserved(store, "alice")
    assert await store.adjust(delta=5, actor="admin:x") == (
        AdjustStatus.DONE,
        Figures(14, 1, 0, 15),
    )
    assert await store.adjust(delta=-4, actor="admin:x") == (
        AdjustStatus.DONE,
        Figures(10, 1, 0, 11),
    )
    assert await store.adjust(set_to=3, actor="admin:x") == (
        AdjustStatus.DONE,
        Figures(3, 1, 0, 4),
    )
    assert await store.figures() == Figures(3, 1, 0, 4)
    entries = [e for e in await ledger(redis, CAMPAIGN) if e["op"] == "adjust"]
    assert [(e["qty"], e["before"], e["after"], e["by"]) for e in entries] == [
        ("5", "9/1/0/10", "14/1/0/15", "admin:x"),
        ("-4", "14/1/0/15", "10/1/0/11", "admin:x"),
        ("-7", "10/1/0/11", "3/1/0/4", "admin:x"),
    ]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_adjust_refuses_below_zero(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(3)
    await reserved(store, "alice")
    before = await redis_snapshot(redis)
    assert await store.adjust(delta=-3, actor=ACTOR) == (
        AdjustStatus.BELOW_ZERO,
        Figures(2, 1, 0, 3),
    )
    assert await store.adjust(set_to=-1, actor=ACTOR) == (
        AdjustStatus.BELOW_ZERO,
        Figures(2, 1, 0, 3),
    )
    assert await redis_snapshot(redis) == before
    assert await store.adjust(delta=-2, actor=ACTOR) == (AdjustStatus.DONE, Figures(0, 1, 0, 1))
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_adjust_without_campaign_or_figure(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    assert await store.adjust(delta=5, actor=ACTOR) == (
        AdjustStatus.NO_CAMPAIGN,
        Figures(0, 0, 0, 0),
    )
    assert await store.adjust(set_to=5, actor=ACTOR) == (
        AdjustStatus.NO_CAMPAIGN,
        Figures(0, 0, 0, 0),
    )
    assert await redis_snapshot(redis) == {}
    with pytest.raises(ValueError, match="delta or set_to"):
        await store.adjust(actor=ACTOR)


MALFORMED_CALLS: dict[str, tuple[str, Callable[[CampaignKeys], list[str]], list[Any]]] = {
    "adjust: unknown how": ("adjust_stock", lambda k: [k.state, k.ledger], ["add", 1, "x", 0, "e"]),
    "adjust: fraction": (
        "adjust_stock",
        lambda k: [k.state, k.ledger],
        ["delta", "1.5", "x", 0, "e"],
    ),
    "adjust: no number": ("adjust_stock", lambda k: [k.state, k.ledger], ["set", "", "x", 0, "e"]),
    "release: into reserved": (
        "release",
        lambda k: [k.state, k.users, k.idempotency, k.ledger, k.deadlines, "r", k.orders, "d"],
        ["rid", "reserved", "reserved", "why", "x", 0, "e", "", ""],
    ),
    "adjust: no ledger length": (
        "adjust_stock",
        lambda k: [k.state, k.ledger],
        ["delta", 1, "x", "", "e"],
    ),
    "release: no ledger length": (
        "release",
        lambda k: [k.state, k.users, k.idempotency, k.ledger, k.deadlines, "r", k.orders, "d"],
        ["rid", "reserved", "released", "why", "x", "", "e", "", ""],
    ),
    "commit: no user limit": (
        "commit",
        lambda k: [k.state, k.users, k.ledger, k.deadlines, "r"],
        ["rid", "committed", 0, "", "", "", "", "", "x", 0, "e", "reserved"],
    ),
    "commit: into released": (
        "commit",
        lambda k: [k.state, k.users, k.ledger, k.deadlines, "r"],
        ["rid", "released", 0, "", 2, "", "", "", "x", 0, "e", "reserved"],
    ),
    "commit: hold without time": (
        "commit",
        lambda k: [k.state, k.users, k.ledger, k.deadlines, "r"],
        ["rid", "held", "", "", 2, "", "", "", "x", 0, "e", "reserved"],
    ),
    "reserve: missing record key": (
        "reserve",
        lambda k: [k.state, k.users, k.idempotency, k.ledger, "i", k.deadlines],
        [2, 0, 0, "sync", "e", "rid", "alice", 1, "", ""],
    ),
    "reserve: unknown mode": (
        "reserve",
        lambda k: [k.state, k.users, k.idempotency, k.ledger, "i", k.deadlines, "r"],
        [2, 0, 0, "later", "e", "rid", "alice", 1, "", ""],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_CALLS))
async def test_malformed_script_calls_are_refused_and_change_nothing(
    case: str, rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)
    before = await redis_snapshot(redis)
    name, keys, args = MALFORMED_CALLS[case]
    with pytest.raises(StorageError, match="refused"):
        await rig.pipe.script(getattr(rig.scripts, name), keys(store.keys), args, name)
    assert await redis_snapshot(redis) == before


async def test_audit_reports_an_indexed_record_that_is_gone_and_repairs_nothing(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)
    kept = await reserved(store, "alice")
    lost = await reserved(store, "bob")
    await redis.delete(store.keys.reservation(lost))  # deleted by hand
    found = await audit(store, repair=False, actor=ACTOR)
    assert (found.reserved_by_records, found.sold_by_records) == (1, 0)
    assert found.missing_records == 1
    assert found.drift  # the counters still count bob's unit: reconcile says so
    assert (await record(redis, store, kept))["state"] == "reserved"
    # a repair would believe the incomplete records and put bob's unit back on sale
    before = await redis_snapshot(redis)
    refused = await audit(store, repair=True, actor=ACTOR)
    assert refused.repair_refused
    assert refused.repaired is None
    assert await redis_snapshot(redis) == before
    assert await store.figures() == Figures(8, 2, 0, 10)


async def test_adjust_announces_sold_out_and_restock(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(3)
    channel = store.keys.events
    async with listening(redis, channel) as pubsub:
        await store.adjust(set_to=0, actor=ACTOR)
        await store.adjust(set_to=0, actor=ACTOR)  # sold out already: no second notice
        await store.adjust(delta=2, actor=ACTOR)
        await store.adjust(delta=1, actor=ACTOR)
        assert await notices(redis, pubsub, channel) == [b"sold-out", b"restock"]
    assert await store.figures() == Figures(3, 0, 0, 3)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


# --------------------------------------------------------------------------- due, sweeper


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


# --------------------------------------------------------------------------- SCRIPT FLUSH


async def test_every_script_survives_a_script_flush(rig: Rig, redis: Redis) -> None:
    store = rig.store(reserve_deadline_ms=60_000)

    async def after_flush(work: Any) -> Any:
        """Flush the script cache, then run ``work``: NOSCRIPT, load, send again."""
        await redis.script_flush()
        trips = rig.pipe.round_trips
        result = await work
        assert rig.pipe.round_trips - trips == 2  # the NOSCRIPT answer, then the retry
        return result

    assert await after_flush(store.init(10)) == (True, Figures(10, 0, 0, 10))
    one, two = attempt("alice"), attempt("bob", 2)
    assert [d.status for d in await after_flush(store.reserve([one, two]))] == [
        ReserveStatus.RESERVED,
        ReserveStatus.RESERVED,
    ]
    assert await after_flush(store.commit(one.reservation_id, target=State.COMMITTED)) == (
        Transition(CommitStatus.DONE, "committed")
    )
    assert await after_flush(release(store, two.reservation_id)) == Transition(
        ReleaseStatus.RELEASED, "released"
    )
    assert await after_flush(store.adjust(delta=1, actor=ACTOR)) == (
        AdjustStatus.DONE,
        Figures(10, 0, 1, 11),
    )
    assert await after_flush(store.due()) == []
    assert await redis.script_exists(rig.scripts.due.sha) == [True]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_concurrent_calls_after_a_flush_all_succeed(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=1)
    await store.init(50)
    await redis.script_flush()
    batches = [[attempt(f"user-{i}-{j}") for j in range(3)] for i in range(10)]
    results = await asyncio.gather(*(store.reserve(b) for b in batches))
    assert [d.status for decisions in results for d in decisions] == [ReserveStatus.RESERVED] * 30
    assert await store.figures() == Figures(20, 30, 0, 50)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


# --------------------------------------------------------------------------- concurrency


async def test_a_crowd_through_the_batcher_gets_exactly_the_stock(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=2)
    await rig.scripts.load(rig.client)
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


# --------------------------------------------------------------------------- AutoPipeline


async def test_the_calls_of_one_tick_share_one_round_trip(rig: Rig, redis: Redis) -> None:
    trips, commands = rig.pipe.round_trips, rig.pipe.commands
    replies = await asyncio.gather(*(rig.pipe.call("INCR", "n", what="incr") for _ in range(300)))
    assert replies == list(range(1, 301))  # in order
    assert rig.pipe.round_trips - trips == 1
    assert rig.pipe.commands - commands == 300


async def test_a_big_tick_is_split_at_max_commands(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    client = Redis.from_url(redis_server.url)
    guard = RedisGuard(1.0)
    pipe = AutoPipeline(client, guard, max_commands=100)
    try:
        replies = await asyncio.gather(*(pipe.call("INCR", "n", what="incr") for _ in range(250)))
        # the three pipelines travel on three connections at once: no order between them
        assert sorted(replies) == list(range(1, 251))
        assert (pipe.round_trips, pipe.commands) == (3, 250)
    finally:
        await pipe.close()
        guard.close()
        await client.aclose()


async def test_one_refused_command_does_not_fail_its_pipeline(rig: Rig, redis: Redis) -> None:
    await redis.hset("a-hash", "f", "v")
    results: tuple[Any, ...] = await asyncio.gather(
        rig.pipe.call("INCR", "n", what="incr"),
        rig.pipe.call("INCR", "a-hash", what="incr"),
        rig.pipe.call("INCR", "n", what="incr"),
        return_exceptions=True,
    )
    good, bad, also_good = results
    assert (good, also_good) == (1, 2)
    assert isinstance(bad, StorageError)
    assert "WRONGTYPE" in str(bad)


async def test_a_redis_that_is_down_gives_storage_error() -> None:
    async with open_rig(f"redis://127.0.0.1:{free_port()}/0") as down:
        store = down.store()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(StorageError) as refused:
            await down.pipe.call("PING", what="ping")
        assert not refused.value.maybe_applied  # no connection: nothing reached Redis
        with pytest.raises(StorageError):
            await store.reserve([attempt("alice")])
        unknown: list[Attempt] = []
        batcher = TickBatcher(
            store.pipe.guard,
            store.submit_reserve,
            store.decisions,
            "reserve",
            unknown=unknown.extend,
        )
        results = await asyncio.gather(
            *(batcher.submit(attempt(f"u{i}")) for i in range(5)), return_exceptions=True
        )
        await batcher.close()
        assert all(isinstance(r, StorageError) and not r.maybe_applied for r in results), results
        assert unknown == []  # nothing to undo: it was never sent
        while not down.pipe.guard.breaker.is_open:
            with contextlib.suppress(StorageError):
                await down.pipe.call("PING", what="ping")
        with pytest.raises(StorageError, match="circuit open") as shut:
            await down.pipe.call("PING", what="ping")
        assert not shut.value.maybe_applied
        assert loop.time() - start < 15  # did not hang (a few 1 s deadlines at most)


async def test_a_paused_redis_gives_storage_error_instead_of_hanging(
    redis_server: EmbeddedRedis, rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)  # the pipeline's connection is open and warm
    process = redis_server.process
    assert process is not None
    loop = asyncio.get_running_loop()
    start = loop.time()
    process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StorageError, match="did not answer") as silent:
            await store.figures()
        waited = loop.time() - start
        assert silent.value.maybe_applied  # written, unanswered: only Redis knows
    finally:
        process.send_signal(signal.SIGCONT)
    assert waited < 5
    assert await store.figures() == Figures(10, 0, 0, 10)  # and it recovers
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


# --------------------------------------------------------------------------- reserve batcher


class WatchedStore(CampaignStore):
    """A real store that says when a reserve call has been handed to the pipeline."""

    def __init__(self, rig: Rig) -> None:
        policy = StorePolicy(per_user_limit=2, reserve_deadline_ms=0, ledger_max_length=1000)
        super().__init__(rig.pipe, rig.scripts, CampaignKeys(CAMPAIGN), policy)
        self.submitted = asyncio.Event()

    def submit_reserve(self, attempts: Sequence[Attempt]) -> asyncio.Future[Any]:
        future = super().submit_reserve(attempts)
        self.submitted.set()
        return future


@pytest.mark.parametrize("when", ["before-flush", "after-submit"])
async def test_a_reservation_whose_requester_went_away_is_released(
    rig: Rig, redis: Redis, when: str
) -> None:
    store = WatchedStore(rig)
    await store.init(10)
    seen: list[tuple[Attempt, Decision]] = []
    batcher = reserve_batcher(store, releasing_winners(store, seen))
    one = attempt("alice", 2)
    waiter = asyncio.create_task(batcher.submit(one))
    if when == "before-flush":
        await asyncio.sleep(0)  # the waiter has queued its attempt; no script call yet
        assert not store.submitted.is_set()
    else:
        async with asyncio.timeout(5):
            await store.submitted.wait()  # the reserve call is on its way; no reply yet
        assert not waiter.done()
    waiter.cancel()

    async def released() -> bool:
        return (await record(redis, store, one.reservation_id)).get("state") == "released"

    # batcher.close() alone does not wait for the release (see test_pipeline.py)
    await wait_for(released)
    await batcher.close()
    assert waiter.cancelled()

    assert seen == [(one, Decision(ReserveStatus.RESERVED, one.reservation_id, 8))]
    fields = await record(redis, store, one.reservation_id)
    assert (fields["state"], fields["reason"]) == ("released", "requester went away")
    assert await store.figures() == Figures(10, 0, 0, 10)
    assert await ops(redis) == ["init", "reserve", "released"]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_the_release_of_an_unclaimed_winner_outlasts_a_redis_stall(
    redis_server: EmbeddedRedis, rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)
    one = attempt("alice")
    decision = await reserve_batcher(store).submit(one)
    assert decision.status is ReserveStatus.RESERVED
    process = redis_server.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        work = release_unclaimed(store, ACTOR)(one, decision)
        assert work is not None
        releasing = asyncio.ensure_future(work)
        await asyncio.sleep(1.5)  # the first try has timed out (1 s deadline)
        assert not releasing.done()  # and it keeps trying
    finally:
        process.send_signal(signal.SIGCONT)
    async with asyncio.timeout(10):
        await releasing
    assert await store.figures() == Figures(10, 0, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_every_unclaimed_outcome_is_handed_over(rig: Rig, redis: Redis) -> None:
    store = rig.store(per_user_limit=1)
    await store.init(1)
    seen: list[tuple[Attempt, Decision]] = []
    batcher = reserve_batcher(store, releasing_winners(store, seen))
    winner, loser = attempt("alice"), attempt("bob")
    waiters = [asyncio.create_task(batcher.submit(a)) for a in (winner, loser)]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()

    async def released() -> bool:
        return (await record(redis, store, winner.reservation_id)).get("state") == "released"

    await wait_for(released)
    await batcher.close()
    assert seen == [
        (winner, Decision(ReserveStatus.RESERVED, winner.reservation_id, 0)),
        (loser, Decision(ReserveStatus.SOLD_OUT, loser.reservation_id, 0)),
    ]
    assert await store.figures() == Figures(1, 0, 0, 1)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_claimed_outcomes_are_not_handed_over(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    seen: list[tuple[Attempt, Decision]] = []
    batcher = reserve_batcher(store, releasing_winners(store, seen))
    one = attempt("alice")
    assert (await batcher.submit(one)).status is ReserveStatus.RESERVED
    await batcher.close()
    assert seen == []
    assert await store.figures() == Figures(9, 1, 0, 10)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
