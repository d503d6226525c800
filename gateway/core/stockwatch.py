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
        #: The holders of sold-out shards (by key base), once loaded.
        self.holders: dict[str, Holders] = {}
        #: Every shard known, by key base; and each campaign's shards.
        self._keys: dict[str, CampaignKeys] = {}
        self._shards: dict[str, set[str]] = {}
        #: Shards (by key base) with nothing left.
        self._empty: set[str] = set()
        #: Each shard's available as last read or decided (a sharded campaign's total
        #: is their sum).
        self.available: dict[str, int] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        #: Set when every campaign must be polled now (a resubscription, a failover).
        self._resync = asyncio.Event()
        #: Told of ``due`` notices, and of every resync (notices may have been missed).
        self.on_due: Callable[[str, int], None] = lambda name, at_ms: None
        self.on_resync: Callable[[], None] = lambda: None
        self._turn = 0
        pipe.topology.on_change(self.resync)

    def mark_sold_out(self, campaign_id: str) -> None:
        """Redis said the campaign (every shard of it) has nothing left."""
        self._epoch += 1
        for base in self._shards.get(campaign_id, ()):
            self._shard_out(base)
        self.sold_out.add(campaign_id)

    def mark_restocked(self, campaign_id: str) -> None:
        self._epoch += 1
        for base in self._shards.get(campaign_id, ()):
            self._shard_in(base)
        self.sold_out.discard(campaign_id)

    def _shard_out(self, base: str) -> None:
        self._empty.add(base)
        self.available[base] = 0
        keys = self._keys.get(base)
        if keys is not None:
            if self._shards.get(keys.campaign_id, set()) <= self._empty:
                self.sold_out.add(keys.campaign_id)
            self._load_holders(base)

    def _shard_in(self, base: str) -> None:
        self._empty.discard(base)
        self.holders.pop(base, None)
        keys = self._keys.get(base)
        if keys is not None:
            self.sold_out.discard(keys.campaign_id)

    def holders_of(self, campaign_id: str) -> frozenset[str] | None:
        """The users holding units of a sold-out campaign, if known (of every shard)."""
        if campaign_id not in self.sold_out:
            return None
        known = [self.holders.get(base) for base in self._shards.get(campaign_id, ())]
        if not known or any(h is None for h in known):
            return None
        return frozenset().union(*(h.users for h in known if h is not None))

    def total_available(self, campaign_id: str) -> int:
        """The campaign's units left, as this process last saw them."""
        return sum(self.available.get(b, 0) for b in self._shards.get(campaign_id, ()))

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
        self._know(keys)
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
        polled = list(zip(keys, replies[1:], strict=True))
        for k, _ in polled:
            self.unreachable.discard(k.campaign_id)
            self.missing.discard(k.campaign_id)
        for k, reply in polled:
            if isinstance(reply, BaseException):
                self.unreachable.add(k.campaign_id)
                continue
            if reply[0] is None:
                self.missing.add(k.campaign_id)
            if epoch == self._epoch:
                self._polled(k, reply)

    def _polled(self, keys: CampaignKeys, reply: list[bytes | None]) -> None:
        available, version = reply
        if available is not None and int(available) == 0:
            self._shard_out(keys.base)
            known = self.holders.get(keys.base)
            if known is not None and known.version != int(version or 0):
                self.holders.pop(keys.base)
                self._load_holders(keys.base)
        else:  # stock left, or no counters at all (503 for buyers, not "sold out")
            self._shard_in(keys.base)
            if available is not None:
                self.available[keys.base] = int(available)

    def _know(self, keys: Iterable[CampaignKeys]) -> None:
        for k in keys:
            self._keys[k.base] = k
            self._shards.setdefault(k.campaign_id, set()).add(k.base)

    async def run_poll(self, campaigns: Callable[[], Iterable[CampaignKeys]]) -> None:
        """Every campaign after a resync; else the next few, round robin, within the
        budget."""
        while True:
            keys = list(campaigns())
            self._know(keys)
            self._forget_all_but({k.base for k in keys})
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

    def _forget_all_but(self, shards: set[str]) -> None:
        """A reload removed campaigns (or shards): their flags and holders go with them."""
        for gone in set(self._keys) - shards:
            campaign_id = self._keys.pop(gone).campaign_id
            self._empty.discard(gone)
            self.holders.pop(gone, None)
            self.available.pop(gone, None)
            mine = self._shards.get(campaign_id, set())
            mine.discard(gone)
            if not mine:
                self._shards.pop(campaign_id, None)
                self.sold_out.discard(campaign_id)
                self.missing.discard(campaign_id)
                self.unreachable.discard(campaign_id)

    # --- holders

    def _load_holders(self, base: str) -> None:
        keys = self._keys.get(base)
        running = self._loading.get(base)
        if keys is None or base in self.holders or (running is not None and not running.done()):
            return
        self._loading[base] = asyncio.ensure_future(self._load(keys))

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
                self.holders[keys.base] = Holders(before, frozenset(users))
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
        by_channel: dict[str, CampaignKeys] = {}

        def channels() -> list[str]:
            by_channel.clear()
            by_channel.update({k.events: k for k in campaigns()})
            return list(by_channel)

        await self.notices.follow(
            channels,
            lambda channel, data: self._notice(by_channel.get(channel), data),
            subscribed=self.resync,
        )

    def _notice(self, keys: CampaignKeys | None, data: bytes) -> None:
        if keys is None:
            return
        self._epoch += 1
        if data == SOLD_OUT_NOTICE:
            self._shard_out(keys.base)
        elif data == RESTOCK_NOTICE:
            self._shard_in(keys.base)
        elif data.startswith(DUE_NOTICE) and data[len(DUE_NOTICE) :].isdigit():
            self.on_due(keys.base, int(data[len(DUE_NOTICE) :]))
