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
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from gateway.core.campaigns import Campaign
from gateway.forwarding.upstream import UpstreamReply
from limiter.errors import StorageError
from limiter.records import CommitStatus, ReleaseStatus, Reply, State, Transition

if TYPE_CHECKING:
    from gateway.core.runtime import Runtime

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


async def keep_reply(campaign: Campaign, rid: str, reply: UpstreamReply) -> None:
    """Keep a refusal's answer on the record (queue mode: the buyer reads it later)."""
    stored = stored_reply(reply)
    if stored is not None:
        with contextlib.suppress(StorageError):
            await campaign.store.keep_reply(rid, stored)


async def commit_accepted(
    runtime: Runtime, campaign: Campaign, rid: str, reply: UpstreamReply
) -> None:
    """Commit (or hold) a reservation the backend accepted; StorageError if Redis failed."""
    await _commit(runtime, campaign, rid, stored_reply(reply))


async def release_refused(
    runtime: Runtime, campaign: Campaign, rid: str, reason: str, dead_letter: bytes = b""
) -> None:
    """Release a reservation the backend did not take; StorageError if Redis failed."""
    result = await campaign.store.release(
        rid,
        leavable=(State.RESERVED,),
        target=State.RELEASED,
        reason=reason,
        actor=runtime.actor,
        dead_letter=dead_letter,
    )
    _unless_counters_missing(campaign, result, ReleaseStatus.NOT_FOUND)


def _unless_counters_missing(campaign: Campaign, result: Transition, not_found: int) -> None:
    """A record whose campaign has no counters (Redis lost them) cannot be settled yet:
    like an unreachable Redis, so that the outcome is kept trying, never dropped."""
    if result.status == not_found and result.state:
        raise StorageError(
            f"campaign {campaign.id} has no counters in Redis; its outcomes wait",
            maybe_applied=False,
        )


async def settle_accepted(
    runtime: Runtime, campaign: Campaign, rid: str, reply: UpstreamReply
) -> None:
    """Commit an accepted reservation; if Redis fails, keep trying in the background
    (and failing that, its kept order lets a sweeper ask the backend again)."""
    commit = partial(commit_accepted, runtime, campaign, rid, reply)
    await _now_or_in_background(runtime, campaign, rid, "commit", commit)


async def give_back(runtime: Runtime, campaign: Campaign, rid: str, reason: str) -> None:
    """Release a reservation the backend did not take; if Redis fails, keep trying in
    the background."""
    release = partial(release_refused, runtime, campaign, rid, reason)
    await _now_or_in_background(runtime, campaign, rid, "release", release)


async def _now_or_in_background(
    runtime: Runtime,
    campaign: Campaign,
    rid: str,
    what: str,
    attempt: Callable[[], Awaitable[None]],
) -> None:
    try:
        await attempt()
    except StorageError as exc:
        log.warning("%s of %s failed (%s); retrying in the background", what, rid, exc)
        runtime.spawn(_retry_until_deadline(campaign, rid, what, attempt))


async def _retry_until_deadline(
    campaign: Campaign, rid: str, what: str, attempt: Callable[[], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + campaign.settings.forward_deadline
    delay = 0.05
    while loop.time() < deadline:
        await asyncio.sleep(delay)
        try:
            await attempt()
            return
        except StorageError:
            delay = min(delay * 2, 1.0)
    log.error(
        "%s of %s never reached Redis; at its deadline a sweeper asks the backend again",
        what,
        rid,
    )


async def _commit(runtime: Runtime, campaign: Campaign, rid: str, reply: Reply | None) -> None:
    s = campaign.settings
    target = State.HELD if s.on_success == "hold" else State.COMMITTED
    result = await campaign.store.commit(
        rid,
        target=target,
        hold_ms=round(s.hold_seconds * 1000),
        retake=True,
        reply=reply,
        actor=runtime.actor,
    )
    _unless_counters_missing(campaign, result, CommitStatus.NOT_FOUND)
    if result.status is CommitStatus.RETAKEN:
        log.warning("reservation %s had gone back to stock before its commit; taken again", rid)
    elif result.status is CommitStatus.GONE:
        log.error(
            "reservation %s went back to stock (%s) before the backend accepted it and no stock "
            "was left to take again: the backend holds an order flashgate did not count",
            rid,
            result.state,
        )
