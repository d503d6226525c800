"""Settling a reservation by the backend's answer, for the sync forward and the
queue dispatcher alike: a 2xx commits (or holds until paid), anything else gives
the units and the quota back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from multidict import CIMultiDict

from gateway.config import CampaignSettings
from gateway.forwarding.upstream import UpstreamReply
from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.records import (
    CommitItem,
    CommitStatus,
    ReleaseItem,
    ReleaseStatus,
    Reply,
    State,
    Transition,
)
from limiter.reserving import Spawn
from limiter.store import CampaignStore

log = logging.getLogger(__name__)

#: Backend answers up to this size are kept for idempotent replays and status polls.
MAX_STORED_REPLY = 64 * 1024
#: Headers a replay does not repeat: sized anew, or a credential that must not rest in Redis.
NOT_REPLAYED = frozenset({"content-type", "content-length", "set-cookie"})


def accepted(status: int) -> bool:
    return 200 <= status < 300


def stored_reply(reply: UpstreamReply) -> Reply | None:
    if len(reply.body) > MAX_STORED_REPLY:
        return None
    kept = [(k, v) for k, v in reply.headers.items() if k.lower() not in NOT_REPLAYED]
    headers = json.dumps(kept, separators=(",", ":")) if kept else ""
    return Reply(reply.status, reply.content_type, reply.body, headers)


def replayed_headers(reply: Reply) -> CIMultiDict[str]:
    """The headers of a stored answer, as the backend sent them (but Set-Cookie)."""
    headers: CIMultiDict[str] = CIMultiDict(json.loads(reply.headers) if reply.headers else ())
    if reply.content_type:
        headers["Content-Type"] = reply.content_type
    return headers


class Settlement:
    """Settling one campaign's reservations by the backend's answer; ``spawn`` runs the
    retries that outlive a request."""

    def __init__(
        self, store: CampaignStore, settings: CampaignSettings, actor: str, spawn: Spawn
    ) -> None:
        self.store = store
        self.settings = settings
        self.actor = actor
        self.spawn = spawn
        guard = store.pipe.guard
        #: The commits and the releases of one event-loop tick: one script call each.
        self.commits: TickBatcher[CommitItem, Transition] = TickBatcher(
            guard, partial(store.submit_commits, actor=actor), store.commits, "commit"
        )
        self.releases: TickBatcher[ReleaseItem, Transition] = TickBatcher(
            guard, partial(store.submit_releases, actor=actor), store.releases, "release"
        )

    async def close(self, grace: float) -> None:
        await asyncio.gather(self.commits.close(grace), self.releases.close(grace))

    async def keep_reply(self, rid: str, reply: UpstreamReply) -> None:
        """Keep a refusal's answer on the record (queue mode: the buyer reads it later)."""
        stored = stored_reply(reply)
        if stored is not None:
            with contextlib.suppress(StorageError):
                await self.store.keep_reply(rid, stored)

    async def commit_accepted(self, rid: str, reply: UpstreamReply) -> None:
        """Commit (or hold) a reservation the backend accepted; StorageError if Redis failed."""
        s = self.settings
        item = CommitItem(
            rid,
            State.HELD if s.on_success == "hold" else State.COMMITTED,
            hold_ms=round(s.hold_seconds * 1000),
            retake=True,
            reply=stored_reply(reply),
        )
        result = await self.commits.submit(item)
        self._unless_counters_missing(result, CommitStatus.NOT_FOUND)
        if result.status is CommitStatus.RETAKEN:
            log.warning("reservation %s had gone back to stock before its commit; taken again", rid)
        elif result.status is CommitStatus.GONE:
            log.error(
                "reservation %s went back to stock (%s) before the backend accepted it and no "
                "stock was left to take again: the backend holds an order flashgate did not count",
                rid,
                result.state,
            )

    async def release_refused(self, rid: str, reason: str, dead_letter: bytes = b"") -> None:
        """Release a reservation the backend did not take; StorageError if Redis failed."""
        item = ReleaseItem(rid, (State.RESERVED,), State.RELEASED, reason, dead_letter=dead_letter)
        result = await self.releases.submit(item)
        self._unless_counters_missing(result, ReleaseStatus.NOT_FOUND)

    def _unless_counters_missing(self, result: Transition, not_found: int) -> None:
        """A record whose campaign has no counters (Redis lost them) cannot be settled yet:
        like an unreachable Redis, so that the outcome is kept trying, never dropped."""
        if result.status == not_found and result.state:
            raise StorageError(
                f"campaign {self.store.campaign_id} has no counters in Redis; its outcomes wait",
                maybe_applied=False,
            )

    async def settle_accepted(self, rid: str, reply: UpstreamReply) -> None:
        """Commit an accepted reservation; if Redis fails, keep trying in the background
        (and failing that, its kept order lets a sweeper ask the backend again)."""
        await now_or_in_background(
            self.spawn,
            self.settings.forward_deadline,
            f"commit of {rid}",
            lambda: self.commit_accepted(rid, reply),
        )

    async def give_back(self, rid: str, reason: str) -> None:
        """Release a reservation the backend did not take; if Redis fails, keep trying in
        the background."""
        await now_or_in_background(
            self.spawn,
            self.settings.forward_deadline,
            f"release of {rid}",
            lambda: self.release_refused(rid, reason),
        )


async def now_or_in_background(
    spawn: Spawn, patience: float, what: str, attempt: Callable[[], Awaitable[None]]
) -> None:
    """Tell Redis an outcome now; if Redis fails, keep trying in the background for
    ``patience`` seconds (the forward deadline: after it a sweeper asks the backend
    again from the kept order)."""
    try:
        await attempt()
    except StorageError as exc:
        log.warning("%s failed (%s); retrying in the background", what, exc)
        spawn(_retry_until(patience, what, attempt))


async def _retry_until(patience: float, what: str, attempt: Callable[[], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.05
    while loop.time() < deadline:
        await asyncio.sleep(delay)
        try:
            await attempt()
            return
        except StorageError:
            delay = min(delay * 2, 1.0)
    log.error("%s never reached Redis; at its deadline a sweeper asks the backend again", what)
