"""Settling reservations whose deadline passed: held and never paid ones go back to
stock; sync ones never settled (their gateway died, or lost Redis, before the
backend's answer) go to the dispatcher, which delivers their kept order again.

Every gateway process sweeps; release.lua checks state and deadline atomically,
so each reservation expires exactly once however many sweepers race.

A sweep costs Redis work only when something falls due. The scripts that set a
deadline announce it (``due <ms>`` on the campaign's events channel) once per
stretch: when the moment announced last has passed, or when this deadline comes
sooner (see announce_due in lua/_prelude.lua). A sweeper sweeps a campaign at that
moment, then reads the campaign's next deadline itself and comes back then; a
deadline set while it knew of an earlier one is found by that read. A campaign
nobody announced anything for is looked at now and then (``BACKSTOP``, within a
budget of reads a second), in case a notice was lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterable

from limiter.errors import StorageError
from limiter.records import ReleaseItem, ReleaseStatus, State
from limiter.store import CampaignStore

log = logging.getLogger(__name__)

BATCH = 100
#: How often the sweeper looks at its schedule, seconds.
TICK = 0.1
#: A campaign with nothing announced has its next deadline read at least this often.
BACKSTOP = 60.0
#: Reads of next deadlines per second at most, beyond the ones a sweep needs.
BUDGET = 10.0
#: Sweepers of many processes sweep within this long of a due moment (spread).
SPREAD = 0.05


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


class Sweeper:
    """Sweeps each campaign when a deadline of it falls due (wall-clock seconds, which
    Redis time stands close to on NTP-kept hosts)."""

    def __init__(self, stores: Callable[[], Iterable[CampaignStore]], actor: str) -> None:
        self.stores = stores
        self.actor = actor
        #: campaign id -> when to sweep it next (inf: nothing known to fall due)
        self._due: dict[str, float] = {}
        #: campaign id -> when its next deadline was last read
        self._read: dict[str, float] = {}

    def announced(self, campaign_id: str, at_ms: int) -> None:
        """A script said a deadline of this campaign falls due at ``at_ms``."""
        at = at_ms / 1000 + random.uniform(0, SPREAD)
        self._due[campaign_id] = min(self._due.get(campaign_id, math.inf), at)

    def resync(self) -> None:
        """Notices may have been missed: read every campaign's next deadline again."""
        self._read.clear()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            stores = {s.campaign_id: s for s in self.stores()}
            for gone in set(self._due) - set(stores):
                self._due.pop(gone)
                self._read.pop(gone, None)
            now = time.time()
            for campaign_id, store in stores.items():
                if self._due.get(campaign_id, math.inf) <= now:
                    await self._sweep(store)
            await self._backstop(stores, now)

    async def _sweep(self, store: CampaignStore) -> None:
        try:
            settled = await sweep(store, self.actor)
            if settled:
                log.info(
                    "campaign %s: %d reservation(s) past their deadline settled",
                    store.campaign_id,
                    settled,
                )
            await self._read_next(store)
        except StorageError as exc:
            log.debug("sweep of %s failed: %s", store.campaign_id, exc)
            self._due[store.campaign_id] = time.time() + 1.0  # Redis is back soon, or not

    async def _read_next(self, store: CampaignStore) -> None:
        """Schedule the campaign's next deadline (a moment already past, because this
        host's clock runs ahead of Redis's, is tried again shortly)."""
        nearest = await store.earliest_deadline()
        now = time.time()
        self._read[store.campaign_id] = now
        if nearest is None:
            self._due[store.campaign_id] = math.inf
        else:
            self._due[store.campaign_id] = max(nearest / 1000, now + TICK) + random.uniform(
                0, SPREAD
            )

    async def _backstop(self, stores: dict[str, CampaignStore], now: float) -> None:
        """Read the next deadline of the campaigns read longest ago (never read first),
        a few per tick."""
        stale = [cid for cid in stores if now - self._read.get(cid, -math.inf) > BACKSTOP]
        stale.sort(key=lambda cid: self._read.get(cid, -math.inf))
        for campaign_id in stale[: max(1, int(BUDGET * TICK))]:
            try:
                await self._read_next(stores[campaign_id])
            except StorageError as exc:
                log.debug("next deadline of %s not read: %s", campaign_id, exc)
                self._read[campaign_id] = now  # not again at once: the budget holds
