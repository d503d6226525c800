"""The reserve batcher: a winner whose requester went away is released (and the release
outlasts a Redis stall); only unclaimed outcomes are handed over.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from limiter.keys import CampaignKeys
from limiter.records import Attempt, Decision, Figures, ReserveStatus
from limiter.reserving import release_unclaimed
from limiter.store import CampaignStore, StorePolicy
from tests.helpers import check_invariant, wait_for
from tests.scripts_rig import (
    ACTOR,
    CAMPAIGN,
    Rig,
    attempt,
    ops,
    record,
    releasing_winners,
    reserve_batcher,
)

pytestmark = pytest.mark.integration


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
        # One loop turn, not a wait for background work: this case needs the moment
        # between the attempt being queued and the batch being flushed.
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
        # the first try has timed out (1 s deadline), and so has the next one
        await wait_for(lambda: rig.pipe.guard.errors.get("release", 0) >= 2, within=10)
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
    await asyncio.sleep(0)  # one loop turn (not a wait): both attempts are queued, then cancelled
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
