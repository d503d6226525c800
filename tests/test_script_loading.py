"""The script cache and the prelude: every script survives SCRIPT FLUSH (NOSCRIPT, load,
send again), and malformed calls are refused by the prelude's checks.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.records import (
    AdjustStatus,
    CommitStatus,
    Figures,
    ReleaseStatus,
    ReserveStatus,
    State,
    Transition,
)
from tests.helpers import check_invariant, redis_snapshot
from tests.scripts_rig import ACTOR, CAMPAIGN, Rig, attempt, release

pytestmark = pytest.mark.integration


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
