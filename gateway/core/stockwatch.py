"""This process's view of every campaign's stock: its local sold-out flags, and, for
a sold-out campaign, who holds units.

A sold-out campaign is answered from memory, without Redis. The flag is set the
moment Redis says so (a reserve reply here, or a ``sold-out`` notice that any
gateway's script published), and cleared by a ``restock`` notice (a release, a
cancel, an increase). Notices are the fast path; a poll is the backstop for a
notice lost while a subscription moved or reconnected, and notices campaigns whose
counters vanished from Redis (a flush, a failover to an empty replica), which make
the process unready: it never recreates them on its own. Every campaign is polled
once at start and after every (re)subscription or topology change; after that the
poll reads at most ``POLL_BUDGET`` counters a second, round robin (every campaign
each ``interval`` when there are few), so an idle gateway with a thousand campaigns
costs Redis a few commands a second, not thousands.

A keyed request after sell-out might be a winner's retry, owed its stored outcome;
the users who hold units number at most the stock, so the holders of a sold-out
campaign are loaded (HSCAN, a chunk per round trip) and a keyed request from anyone
else is answered sold-out from memory too. The set is right as long as the campaign
stays sold out: a new holder needs stock, which a restock notice announces; the
holders' version (``holders_v``, bumped by every script that adds one) is read with
each poll, so that a missed restock and sale are noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.notices import Notices
from limiter.pipeline import AutoPipeline

log = logging.getLogger(__name__)

SOLD_OUT_NOTICE = b"sold-out"
RESTOCK_NOTICE = b"restock"
#: ``due <ms>``: a deadline of the campaign falls due then (see core/sweeper.py).
DUE_NOTICE = b"due "
#: Counters the backstop poll reads per second at most, per process.
POLL_BUDGET = 10.0
#: Users per HSCAN round trip when loading a sold-out campaign's holders.
HOLDERS_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Holders:
    """Who held units at ``version`` of the campaign's holders (while sold out)."""

    version: int
    users: frozenset[str]


class StockWatch:
    def __init__(self, notices: Notices, pipe: AutoPipeline, *, interval: float = 0.25) -> None:
        self.notices = notices
        self.pipe = pipe
        self.interval = interval
        self.sold_out: set[str] = set()
        #: Campaigns whose counters the poll did not find in Redis.
        self.missing: set[str] = set()
        #: Campaigns whose Redis node did not answer the poll (a cluster node down).
        self.unreachable: set[str] = set()
        #: Bumped by every direct flag change, so a poll that read before it cannot undo it.
        self._epoch = 0
        #: When a poll last got an answer from Redis (monotonic), for readiness.
        self.last_success = float("-inf")
        #: The holders of sold-out campaigns, once loaded.
        self.holders: dict[str, Holders] = {}
        self._keys: dict[str, CampaignKeys] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        #: Set when every campaign must be polled now (a resubscription, a failover).
        self._resync = asyncio.Event()
        #: Told of ``due`` notices, and of every resync (notices may have been missed).
        self.on_due: Callable[[str, int], None] = lambda campaign_id, at_ms: None
        self.on_resync: Callable[[], None] = lambda: None
        self._turn = 0
        pipe.topology.on_change(self.resync)

    def mark_sold_out(self, campaign_id: str) -> None:
        self.sold_out.add(campaign_id)
        self._epoch += 1
        self._load_holders(campaign_id)

    def mark_restocked(self, campaign_id: str) -> None:
        self.sold_out.discard(campaign_id)
        self._epoch += 1
        self.holders.pop(campaign_id, None)

    def holders_of(self, campaign_id: str) -> frozenset[str] | None:
        """The users holding units of a sold-out campaign, if known."""
        known = self.holders.get(campaign_id)
        return known.users if known is not None and campaign_id in self.sold_out else None

    def resync(self) -> None:
        """Poll every campaign at the next turn (notices may have been missed)."""
        self._resync.set()
        self.on_resync()

    # --- polling

    async def poll(self, campaigns: Iterable[CampaignKeys]) -> None:
        """Read these campaigns' counters in one round trip per node and update the
        flags. A campaign whose node does not answer keeps its flag and is listed as
        unreachable; StorageError when no node answered at all."""
        keys = list(campaigns)
        self._keys.update((k.campaign_id, k) for k in keys)
        epoch = self._epoch
        started = time.monotonic()
        replies = await asyncio.gather(
            self.pipe.call("PING", what="poll counters"),
            *(
                self.pipe.call("HMGET", k.state, "available", "holders_v", what="poll counters")
                for k in keys
            ),
            return_exceptions=True,
        )
        failures = [r for r in replies if isinstance(r, BaseException)]
        if len(failures) == len(replies):
            raise (
                failures[0]
                if isinstance(failures[0], StorageError)
                else StorageError(f"stock poll failed: {failures[0]!r}")
            )
        self.last_success = started
        for k, reply in zip(keys, replies[1:], strict=True):
            self._polled(k.campaign_id, reply, epoch == self._epoch)

    def _polled(
        self, campaign_id: str, reply: list[bytes | None] | BaseException, current: bool
    ) -> None:
        self.unreachable.discard(campaign_id)
        self.missing.discard(campaign_id)
        if isinstance(reply, BaseException):
            self.unreachable.add(campaign_id)
            return
        available, version = reply
        if available is None:
            self.missing.add(campaign_id)
        if not current:
            return
        if available is not None and int(available) == 0:
            self.sold_out.add(campaign_id)
            known = self.holders.get(campaign_id)
            if known is None or known.version != int(version or 0):
                self._load_holders(campaign_id)
        else:  # stock left, or no counters at all (503 for buyers, not "sold out")
            self.sold_out.discard(campaign_id)
            self.holders.pop(campaign_id, None)

    async def run_poll(self, campaigns: Callable[[], Iterable[CampaignKeys]]) -> None:
        """Every campaign after a resync; else the next few, round robin, within the
        budget."""
        while True:
            keys = list(campaigns())
            self._forget_all_but({k.campaign_id for k in keys})
            turn = keys if self._resync.is_set() else self._next_turn(keys)
            self._resync.clear()
            try:
                await self.poll(turn)
            except StorageError as exc:
                log.debug("stock poll failed: %s", exc)
                self._resync.set()  # nothing was read: read everything once it answers
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._resync.wait()

    def _next_turn(self, keys: list[CampaignKeys]) -> list[CampaignKeys]:
        if not keys:
            return []
        size = max(1, min(len(keys), int(POLL_BUDGET * self.interval)))
        start = self._turn % len(keys)
        self._turn = start + size
        return (keys[start:] + keys[:start])[:size]

    def _forget_all_but(self, campaigns: set[str]) -> None:
        """A reload removed campaigns: their flags and holders go with them."""
        for gone in set(self._keys) - campaigns:
            self._keys.pop(gone)
            self.sold_out.discard(gone)
            self.holders.pop(gone, None)
            self.missing.discard(gone)
            self.unreachable.discard(gone)

    # --- holders

    def _load_holders(self, campaign_id: str) -> None:
        keys = self._keys.get(campaign_id)
        running = self._loading.get(campaign_id)
        if keys is None or (running is not None and not running.done()):
            return
        self._loading[campaign_id] = asyncio.ensure_future(self._load(keys))

    async def _load(self, keys: CampaignKeys) -> None:
        """Read the holders in chunks; keep them only if nothing added one meanwhile
        (the version before equals the version after) and it is still sold out."""
        try:
            before = await self._version(keys)
            users: set[str] = set()
            cursor: bytes | int = 0
            while True:
                cursor, found = await self.pipe.call(
                    "HSCAN", keys.users, cursor, "COUNT", HOLDERS_CHUNK, what="read holders"
                )
                users.update(user.decode() for user in found[::2])
                if int(cursor) == 0:
                    break
            if before is not None and await self._version(keys) == before:
                self.holders[keys.campaign_id] = Holders(before, frozenset(users))
        except StorageError as exc:
            log.debug("holders of %s not loaded: %s", keys.campaign_id, exc)

    async def _version(self, keys: CampaignKeys) -> int | None:
        """The holders' version while sold out; None when stock is left."""
        available, version = await self.pipe.call(
            "HMGET", keys.state, "available", "holders_v", what="read holders"
        )
        return int(version or 0) if available is not None and int(available) == 0 else None

    async def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)

    # --- notices

    async def run_listener(self, campaigns: Callable[[], Iterable[CampaignKeys]]) -> None:
        """Follow every campaign's events channel (reloads add and remove channels)."""
        by_channel: dict[str, str] = {}

        def channels() -> list[str]:
            by_channel.clear()
            by_channel.update({k.events: k.campaign_id for k in campaigns()})
            return list(by_channel)

        await self.notices.follow(
            channels,
            lambda channel, data: self._notice(by_channel.get(channel, ""), data),
            subscribed=self.resync,
        )

    def _notice(self, campaign_id: str, data: bytes) -> None:
        if not campaign_id:
            return
        if data == SOLD_OUT_NOTICE:
            self.mark_sold_out(campaign_id)
        elif data == RESTOCK_NOTICE:
            self.mark_restocked(campaign_id)
        elif data.startswith(DUE_NOTICE) and data[len(DUE_NOTICE) :].isdigit():
            self.on_due(campaign_id, int(data[len(DUE_NOTICE) :]))
