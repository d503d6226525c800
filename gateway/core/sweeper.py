"""Settling reservations whose deadline passed: held and never paid ones go back to
stock; sync ones never settled (their gateway died, or lost Redis, before the
backend's answer) go to the dispatcher, which delivers their kept order again.

Every gateway process sweeps; release.lua checks state and deadline atomically,
so each reservation expires exactly once however many sweepers race.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable

from limiter.errors import StorageError
from limiter.records import ReleaseItem, ReleaseStatus, State
from limiter.store import CampaignStore

log = logging.getLogger(__name__)

BATCH = 100


async def sweep(store: CampaignStore, actor: str) -> int:
    """Settle every due reservation of one campaign, a batch of them per script call;
    returns how many this call settled."""
    expired = 0
    while True:
        due = await store.due(BATCH)
        items = [
            ReleaseItem(rid, (State.RESERVED, State.HELD), State.EXPIRED, "deadline passed", True)
            for rid in due
        ]
        results = await store.release_all(items, actor) if items else []
        before = expired
        for rid, result in zip(due, results, strict=True):
            if result.status is ReleaseStatus.RELEASED:
                expired += 1
                log.debug("reservation %s expired", rid)
            elif result.status is ReleaseStatus.REDELIVER:
                expired += 1
                log.warning(
                    "reservation %s was never settled or queued (its gateway died or lost "
                    "Redis): its kept order is queued for delivery",
                    rid,
                )
        if len(due) < BATCH or expired == before:
            return expired


async def run_sweeper(
    stores: Callable[[], Iterable[CampaignStore]], actor: str, interval: float
) -> None:
    while True:
        # Jitter keeps the sweepers of many processes from waking together.
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        for store in list(stores()):
            try:
                settled = await sweep(store, actor)
                if settled:
                    log.info(
                        "campaign %s: %d reservation(s) past their deadline settled",
                        store.campaign_id,
                        settled,
                    )
            except StorageError as exc:
                log.debug("sweep of %s failed: %s", store.campaign_id, exc)
