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
from typing import Protocol

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


class Sweepable(Protocol):
    """What has deadlines to keep: a campaign's shard, or a cart."""

    @property
    def name(self) -> str:
        """Names it among all of them (its keys' base), as its ``due`` notices do."""
        ...

    async def earliest_deadline(self) -> int | None: ...

    async def sweep(self, actor: str) -> int:
        """Settle whatever is due; how many were settled."""
        ...


class CampaignSweep:
    """A campaign shard's deadlines, as the sweeper sees them."""

    def __init__(self, store: CampaignStore) -> None:
        self.store = store

    @property
    def name(self) -> str:
        return self.store.name

    async def earliest_deadline(self) -> int | None:
        return await self.store.earliest_deadline()

    async def sweep(self, actor: str) -> int:
        return await sweep(self.store, actor)


class Sweeper:
    """Sweeps each campaign shard (and cart) when a deadline of it falls due
    (wall-clock seconds, which Redis time stands close to on NTP-kept hosts)."""

    def __init__(self, sweepables: Callable[[], Iterable[Sweepable]], actor: str) -> None:
        self.sweepables = sweepables
        self.actor = actor
        #: name -> when to sweep it next (inf: nothing known to fall due)
        self._due: dict[str, float] = {}
        #: name -> when its next deadline was last read
        self._read: dict[str, float] = {}

    def announced(self, name: str, at_ms: int) -> None:
        """A script said a deadline of ``name`` (a shard's or a cart's key base) falls
        due at ``at_ms``."""
        at = at_ms / 1000 + random.uniform(0, SPREAD)
        self._due[name] = min(self._due.get(name, math.inf), at)

    def resync(self) -> None:
        """Notices may have been missed: read every campaign's next deadline again."""
        self._read.clear()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            each = {s.name: s for s in self.sweepables()}
            for gone in set(self._due) - set(each):
                self._due.pop(gone)
                self._read.pop(gone, None)
            now = time.time()
            for name, sweepable in each.items():
                if self._due.get(name, math.inf) <= now:
                    await self._sweep(sweepable)
            await self._backstop(each, now)

    async def _sweep(self, sweepable: Sweepable) -> None:
        try:
            settled = await sweepable.sweep(self.actor)
            if settled:
                log.info("%s: %d past their deadline settled", sweepable.name, settled)
            await self._read_next(sweepable)
        except StorageError as exc:
            log.debug("sweep of %s failed: %s", sweepable.name, exc)
            self._due[sweepable.name] = time.time() + 1.0  # Redis is back soon, or not

    async def _read_next(self, sweepable: Sweepable) -> None:
        """Schedule the next deadline (a moment already past, because this host's clock
        runs ahead of Redis's, is tried again shortly)."""
        nearest = await sweepable.earliest_deadline()
        now = time.time()
        self._read[sweepable.name] = now
        if nearest is None:
            self._due[sweepable.name] = math.inf
        else:
            self._due[sweepable.name] = max(nearest / 1000, now + TICK) + random.uniform(0, SPREAD)

    async def _backstop(self, each: dict[str, Sweepable], now: float) -> None:
        """Read the next deadline of the ones read longest ago (never read first), a few
        per tick."""
        stale = [name for name in each if now - self._read.get(name, -math.inf) > BACKSTOP]
        stale.sort(key=lambda name: self._read.get(name, -math.inf))
        for name in stale[: max(1, int(BUDGET * TICK))]:
            try:
                await self._read_next(each[name])
            except StorageError as exc:
                log.debug("next deadline of %s not read: %s", name, exc)
                self._read[name] = now  # not again at once: the budget holds
