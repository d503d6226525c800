"""Settling a reservation by the backend's answer, for the sync forward and the
queue dispatcher alike: a 2xx commits (or holds until paid), anything else gives
the units and the quota back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from gateway.campaigns import Campaign
from gateway.upstream import UpstreamReply
from limiter.errors import StorageError
from limiter.records import CommitStatus, Reply, State

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger(__name__)

#: Backend answers up to this size are kept for idempotent replays and status polls.
MAX_STORED_REPLY = 64 * 1024


def accepted(status: int) -> bool:
    return 200 <= status < 300


def stored_reply(reply: UpstreamReply) -> Reply | None:
    if len(reply.body) > MAX_STORED_REPLY:
        return None
    return Reply(reply.status, reply.content_type, reply.body)


async def keep_reply(campaign: Campaign, rid: str, reply: UpstreamReply) -> None:
    """Keep a refusal's answer on the record (queue mode: the buyer reads it later)."""
    stored = stored_reply(reply)
    if stored is not None:
        with contextlib.suppress(StorageError):
            await campaign.store.keep_reply(rid, stored)


async def settle_accepted(
    runtime: Runtime, campaign: Campaign, rid: str, reply: UpstreamReply
) -> None:
    """Commit (or hold) a reservation the backend accepted; if Redis fails, keep trying
    in the background (and failing that, its kept order lets a sweeper ask again)."""
    stored = stored_reply(reply)
    try:
        await _commit(runtime, campaign, rid, stored)
    except StorageError as exc:
        log.warning("commit of %s failed (%s); retrying in the background", rid, exc)
        runtime.spawn(_commit_until_deadline(runtime, campaign, rid, stored))


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
    if result.status is CommitStatus.RETAKEN:
        log.warning("reservation %s had gone back to stock before its commit; taken again", rid)
    elif result.status is CommitStatus.GONE:
        log.error(
            "reservation %s went back to stock (%s) before the backend accepted it and no stock "
            "was left to take again: the backend holds an order flashgate did not count",
            rid,
            result.state,
        )


async def _commit_until_deadline(
    runtime: Runtime, campaign: Campaign, rid: str, reply: Reply | None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + campaign.settings.forward_deadline
    delay = 0.05
    while loop.time() < deadline:
        await asyncio.sleep(delay)
        try:
            await _commit(runtime, campaign, rid, reply)
            return
        except StorageError:
            delay = min(delay * 2, 1.0)
    log.error("commit of %s never reached Redis; its deadline hands it back for redelivery", rid)


async def give_back(
    runtime: Runtime, campaign: Campaign, rid: str, reason: str, dead_letter: bytes = b""
) -> bool:
    """Release a reservation the backend did not take; False if Redis could not be told
    (then its deadline releases it)."""
    try:
        await campaign.store.release(
            rid,
            leavable=(State.RESERVED,),
            target=State.RELEASED,
            reason=reason,
            actor=runtime.actor,
            dead_letter=dead_letter,
        )
    except StorageError as exc:
        log.warning("release of %s failed (%s); its deadline will release it", rid, exc)
        return False
    return True
