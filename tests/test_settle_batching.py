"""The commits and the releases of one event-loop tick go to Redis as one script call
each, as the reserves do: a winner costs a fraction of a script call, not one."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict
from redis.asyncio import Redis

from gateway.config import CampaignSettings, Route
from gateway.forwarding.settle import Settlement
from gateway.forwarding.upstream import UpstreamReply
from limiter.keys import new_reservation_id
from limiter.records import Attempt, CommitItem, ReserveStatus, State
from tests.helpers import check_invariant
from tests.scripts_rig import CAMPAIGN, Rig

pytestmark = pytest.mark.integration

WINNERS = 40


async def _evalshas(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def _settlement_with_winners(rig: Rig) -> tuple[Settlement, list[str]]:
    store = rig.store(per_user_limit=1)
    await rig.pipe.load_scripts(rig.scripts.all())  # no NOSCRIPT round in what is counted
    await store.init(WINNERS)
    attempts = [Attempt(new_reservation_id(CAMPAIGN), f"user-{i}", 1) for i in range(WINNERS)]
    decisions = await store.reserve(attempts)
    assert all(d.status is ReserveStatus.RESERVED for d in decisions)
    settings = CampaignSettings(
        id=CAMPAIGN, route=Route("POST", "/buy"), upstream="shop", stock=WINNERS
    )
    settle = Settlement(store, settings, "test", lambda work: asyncio.ensure_future(work))
    return settle, [a.reservation_id for a in attempts]


ACCEPTED = UpstreamReply(201, CIMultiDict({"Content-Type": "application/json"}), b"{}")


async def test_the_commits_of_one_tick_are_one_script_call(rig: Rig, redis: Redis) -> None:
    settle, rids = await _settlement_with_winners(rig)
    before = await _evalshas(redis)
    await asyncio.gather(*(settle.commit_accepted(rid, ACCEPTED) for rid in rids))
    assert await _evalshas(redis) - before == 1
    for rid in rids:
        record = await rig.store().reservation(rid)
        assert record is not None
        assert record.state is State.COMMITTED
        assert record.reply is not None
        assert record.reply.status == 201
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["sold"], state["reserved"]) == (WINNERS, 0)
    await settle.close(1.0)


async def test_the_releases_of_one_tick_are_one_script_call(rig: Rig, redis: Redis) -> None:
    settle, rids = await _settlement_with_winners(rig)
    before = await _evalshas(redis)
    await asyncio.gather(*(settle.release_refused(rid, "upstream answered 409") for rid in rids))
    assert await _evalshas(redis) - before == 1
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"]) == (WINNERS, 0)
    await settle.close(1.0)


async def test_a_batch_of_commits_and_repeats_each_get_their_own_answer(
    rig: Rig, redis: Redis
) -> None:
    """One call may carry the same reservation twice and one that does not exist: each
    item is decided on its own, in order."""
    settle, rids = await _settlement_with_winners(rig)
    first, second = rids[:2]
    missing = new_reservation_id(CAMPAIGN)
    results = await asyncio.gather(
        settle.store.commit(first, target=State.COMMITTED),
        settle.commits.submit(settle_item(first)),
        settle.commits.submit(settle_item(second)),
        settle.commits.submit(settle_item(missing)),
    )
    assert [r.status for r in results] == [0, 1, 0, 3]
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert state["sold"] == 2
    await settle.close(1.0)


def settle_item(rid: str) -> CommitItem:
    return CommitItem(rid, State.COMMITTED, retake=True)
