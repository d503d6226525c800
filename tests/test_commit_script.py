"""commit.lua: sales, holds and confirms, late acceptances (retake or conflict), and
the kept backend reply.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from limiter.keys import idempotency_field, new_reservation_id
from limiter.records import (
    AdjustStatus,
    CommitStatus,
    Figures,
    Reply,
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
    ops,
    record,
    release,
    reserved,
    users,
)

pytestmark = pytest.mark.integration


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
