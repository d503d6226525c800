"""The reserve batcher, with its undo: a reservation whose requester did not hear
about it (went away, timed out, or the answer was lost) goes back to stock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.records import (
    Attempt,
    Decision,
    ReleaseItem,
    ReleaseStatus,
    ReserveStatus,
    State,
    Transition,
)
from limiter.store import CampaignStore

log = logging.getLogger(__name__)

#: How long to keep trying to undo reservations whose outcome never came back.
UNDO_PATIENCE = 600.0

Spawn = Callable[[Coroutine[Any, Any, Any]], object]
Unclaimed = Callable[[Attempt, Decision], Awaitable[object] | None]


def reserve_batcher(
    store: CampaignStore, actor: str, spawn: Spawn
) -> TickBatcher[Attempt, Decision]:
    """reserve.lua calls of one event-loop tick; ``spawn`` runs the undoing."""

    def unknown(attempts: Sequence[Attempt]) -> None:
        # The requesters got 503; in queue mode this keeps an order its buyer was told
        # failed from being delivered.
        spawn(undo(store, [a.reservation_id for a in attempts], actor))

    return TickBatcher(
        store.pipe.guard,
        store.submit_reserve,
        store.decisions,
        "reserve",
        unclaimed=release_unclaimed(store, actor),
        unknown=unknown,
    )


def release_unclaimed(store: CampaignStore, actor: str) -> Unclaimed:
    """A reservation won after its requester stopped waiting goes back to stock."""

    def unclaimed(attempt: Attempt, decision: Decision) -> Awaitable[object] | None:
        if decision.status is not ReserveStatus.RESERVED:
            return None
        return undo(store, [attempt.reservation_id], actor, reason="requester went away")

    return unclaimed


async def undo(
    store: CampaignStore,
    reservation_ids: list[str],
    actor: str,
    reason: str = "its requester never learnt the outcome",
) -> None:
    """Once Redis answers again, release whatever these attempts reserved (a release of a
    reservation that was never made changes nothing). Kept trying while Redis fails or
    the campaign's counters are missing."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + UNDO_PATIENCE
    delay = 0.1
    while reservation_ids:
        items = [
            ReleaseItem(rid, (State.RESERVED,), State.RELEASED, reason, tombstone=True)
            for rid in reservation_ids
        ]
        try:
            results: Sequence[Transition | BaseException] = await store.release_all(items, actor)
        except StorageError as exc:
            results = [exc] * len(items)
        reservation_ids = [
            rid for rid, r in zip(reservation_ids, results, strict=True) if not _done(r)
        ]
        if reservation_ids and loop.time() > give_up:
            log.error(
                "could not undo %d reservation(s) of %s; their deadline or reconcile will",
                len(reservation_ids),
                store.campaign_id,
            )
            return
        if reservation_ids:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _done(result: Transition | BaseException) -> bool:
    """Released, or nothing to release; not while Redis failed or lost the counters."""
    if isinstance(result, BaseException):
        return False
    return not (result.status == ReleaseStatus.NOT_FOUND and result.state)
