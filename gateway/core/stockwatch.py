"""This process's view of every campaign's stock, and its local sold-out flags.

A sold-out campaign is answered from memory, without Redis. The flag is set the
moment Redis says so (a reserve reply here, or a ``sold-out`` notice that any
gateway's script published), and cleared by a ``restock`` notice (a release, a
cancel, an increase). A poll every ``interval`` reads all counters in one
pipeline: it covers lost notices and reconnects, and notices campaigns whose
counters vanished from Redis (a flush, a failover to an empty replica), which
make the process unready: it never recreates them on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.notices import Notices
from limiter.pipeline import AutoPipeline

log = logging.getLogger(__name__)

SOLD_OUT_NOTICE = b"sold-out"
RESTOCK_NOTICE = b"restock"


class StockWatch:
    def __init__(self, notices: Notices, pipe: AutoPipeline, *, interval: float = 0.25) -> None:
        self.notices = notices
        self.pipe = pipe
        self.interval = interval
        self.sold_out: set[str] = set()
        #: Campaigns whose counters the last poll did not find in Redis.
        self.missing: set[str] = set()
        #: Campaigns whose Redis node did not answer the last poll (a cluster node down).
        self.unreachable: set[str] = set()
        #: Bumped by every direct flag change, so a poll that read before it cannot undo it.
        self._epoch = 0
        #: When a poll last got an answer from Redis (monotonic), for readiness.
        self.last_success = float("-inf")

    def mark_sold_out(self, campaign_id: str) -> None:
        self.sold_out.add(campaign_id)
        self._epoch += 1

    def mark_restocked(self, campaign_id: str) -> None:
        self.sold_out.discard(campaign_id)
        self._epoch += 1

    async def poll(self, campaigns: Iterable[CampaignKeys]) -> None:
        """Read every campaign's stock in one round trip per node and update the flags.
        A campaign whose node does not answer keeps its flag and is listed as
        unreachable; StorageError when no node answered at all."""
        keys = list(campaigns)
        epoch = self._epoch
        started = time.monotonic()
        replies = await asyncio.gather(
            self.pipe.call("PING", what="poll counters"),
            *(self.pipe.call("HGET", k.state, "available", what="poll counters") for k in keys),
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
        missing: set[str] = set()
        unreachable: set[str] = set()
        for k, available in zip(keys, replies[1:], strict=True):
            if isinstance(available, BaseException):
                unreachable.add(k.campaign_id)
                continue
            if available is None:
                missing.add(k.campaign_id)
            if epoch != self._epoch:
                continue
            if available is not None and int(available) == 0:
                self.sold_out.add(k.campaign_id)
            else:  # stock left, or no counters at all (503 for buyers, not "sold out")
                self.sold_out.discard(k.campaign_id)
        self.missing = missing
        self.unreachable = unreachable

    async def run_poll(self, campaigns: Callable[[], Iterable[CampaignKeys]]) -> None:
        while True:
            try:
                await self.poll(campaigns())
            except StorageError as exc:
                log.debug("stock poll failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def run_listener(self, campaigns: Callable[[], Iterable[CampaignKeys]]) -> None:
        """Follow every campaign's events channel (reloads add and remove channels)."""
        by_channel: dict[str, str] = {}

        def channels() -> list[str]:
            by_channel.clear()
            by_channel.update({k.events: k.campaign_id for k in campaigns()})
            return list(by_channel)

        await self.notices.follow(
            channels, lambda channel, data: self._notice(by_channel.get(channel, ""), data)
        )

    def _notice(self, campaign_id: str, data: bytes) -> None:
        if not campaign_id:
            return
        if data == SOLD_OUT_NOTICE:
            self.mark_sold_out(campaign_id)
        elif data == RESTOCK_NOTICE:
            self.mark_restocked(campaign_id)
