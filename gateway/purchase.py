"""The purchase flow of one request, from the sold-out flag to the backend's answer.

Order matters: the cheapest refusals come first (local flag), then the buyer's
input (no Redis), then one atomic decision in Redis, then the backend. A
reservation the backend did not accept goes back to stock before the buyer hears
about it; one it accepted is committed (or held until paid).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from gateway.buyer import IDEMPOTENCY_HEADER, Order, idempotency_key, read_order
from gateway.campaigns import Campaign
from gateway.clientip import forwarded_for
from gateway.errors import UpstreamError
from gateway.problems import Code, Problem
from gateway.upstream import OutboundRequest, UpstreamReply
from limiter.errors import StorageError
from limiter.keys import idempotency_field, new_reservation_id
from limiter.records import Attempt, CommitStatus, Decision, Reply, ReserveStatus, State

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger(__name__)

RESERVATION_HEADER = "X-Reservation-Id"
REPLAYED_HEADER = "Idempotent-Replayed"
#: Backend answers up to this size are kept for idempotent replays.
MAX_STORED_REPLY = 64 * 1024


async def purchase(
    runtime: Runtime, campaign: Campaign, request: web.Request
) -> web.StreamResponse:
    outside = campaign.shaper.window()
    if outside is not None:
        return outside.response()
    # A retry with an Idempotency-Key may be owed its earlier outcome, so only
    # requests without one are answered from the local flag.
    if campaign.id in runtime.watch.sold_out and IDEMPOTENCY_HEADER not in request.headers:
        return campaign.sold_out.response()
    try:
        user = runtime.identity(request)
        key = idempotency_key(request)
        order = await read_order(request, campaign.settings.max_quantity, runtime.max_body)
        await campaign.shaper.admit(request, user)
        attempt = Attempt(
            new_reservation_id(campaign.id),
            user,
            order.quantity,
            idempotency_field(user, key) if key else "",
        )
        decision = await campaign.batcher.submit(attempt)
        return await _outcome(runtime, campaign, request, attempt, order, decision)
    except Problem as problem:
        return problem.response()
    except StorageError as exc:
        log.warning("campaign %s: %s", campaign.id, exc)
        return _unavailable("redis could not decide; nothing was reserved or charged")


def _unavailable(detail: str) -> web.Response:
    return Problem(Code.UNAVAILABLE, detail, headers={"Retry-After": "1"}).response()


async def _outcome(
    runtime: Runtime,
    campaign: Campaign,
    request: web.Request,
    attempt: Attempt,
    order: Order,
    decision: Decision,
) -> web.StreamResponse:
    match decision.status:
        case ReserveStatus.RESERVED:
            return await _forward(runtime, campaign, request, attempt, order)
        case ReserveStatus.DUPLICATE:
            return await _replay(campaign, decision.reservation_id)
        case ReserveStatus.SOLD_OUT:
            runtime.watch.mark_sold_out(campaign.id)
            return campaign.sold_out.response()
        case ReserveStatus.INSUFFICIENT:
            raise Problem(
                Code.INSUFFICIENT_STOCK,
                f"only {decision.figure} left, {attempt.quantity} asked",
                available=decision.figure,
            )
        case ReserveStatus.LIMIT_EXCEEDED:
            limit = campaign.settings.per_user_limit
            raise Problem(
                Code.LIMIT_EXCEEDED,
                f"at most {limit} per user; you hold {decision.figure}, asked {attempt.quantity}",
                limit=limit,
                held=decision.figure,
            )
        case _:
            log.error("campaign %s has no counters in Redis: did Redis lose its data?", campaign.id)
            return _unavailable(f"campaign {campaign.id} is not initialised in Redis")


async def _forward(
    runtime: Runtime, campaign: Campaign, request: web.Request, attempt: Attempt, order: Order
) -> web.StreamResponse:
    rid = attempt.reservation_id
    outbound = OutboundRequest(request.method, request.path_qs, request.headers, order.body)
    extra = {
        RESERVATION_HEADER: rid,
        "X-Campaign-Id": campaign.id,
        "X-User-Id": attempt.user_id,
        "X-Quantity": str(attempt.quantity),
        "X-Forwarded-For": forwarded_for(request, runtime.settings.gateway.trusted_proxies),
        "X-Forwarded-Proto": request.scheme,
        "X-Forwarded-Host": request.host,
    }
    try:
        reply = await campaign.upstream.send(outbound, extra)
    except UpstreamError as exc:
        code = Code.UPSTREAM_TIMEOUT if exc.timed_out else Code.UPSTREAM_FAILED
        await _give_back(campaign, rid, code.value)
        raise Problem(
            code,
            f"{exc}; the reservation was released",
            headers={RESERVATION_HEADER: rid},
            reservation_id=rid,
        ) from None
    if 200 <= reply.status < 300:
        await _settle(runtime, campaign, rid, reply)
        return _relay(reply, rid)
    await _give_back(campaign, rid, f"upstream answered {reply.status}")
    if reply.status >= 500:
        raise Problem(
            Code.UPSTREAM_FAILED,
            f"the order backend answered {reply.status}; the reservation was released",
            headers={RESERVATION_HEADER: rid},
            reservation_id=rid,
            upstream_status=reply.status,
        )
    return _relay(reply, rid)


def _relay(reply: UpstreamReply, rid: str, replayed: bool = False) -> web.Response:
    headers = reply.headers.copy()
    headers.popall("Content-Length", None)
    headers[RESERVATION_HEADER] = rid
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return web.Response(status=reply.status, headers=headers, body=reply.body)


async def _give_back(campaign: Campaign, rid: str, reason: str) -> None:
    """Release a reservation the backend did not accept, before the buyer is answered."""
    try:
        await campaign.store.release(
            rid, leavable=(State.RESERVED,), target=State.RELEASED, reason=reason, actor="gateway"
        )
    except StorageError as exc:
        log.warning("release of %s failed (%s); its deadline will release it", rid, exc)


async def _settle(runtime: Runtime, campaign: Campaign, rid: str, reply: UpstreamReply) -> None:
    """Commit (or hold) an accepted reservation; keep trying in the background if Redis fails."""
    stored = None
    if len(reply.body) <= MAX_STORED_REPLY:
        stored = Reply(reply.status, reply.content_type, reply.body)
    try:
        await _commit(campaign, rid, stored)
    except StorageError as exc:
        log.warning("commit of %s failed (%s); retrying in the background", rid, exc)
        runtime.spawn(_commit_until_deadline(campaign, rid, stored))


async def _commit(campaign: Campaign, rid: str, reply: Reply | None) -> None:
    result = await campaign.store.commit(rid, target=State.COMMITTED, retake=True, reply=reply)
    if result.status is CommitStatus.RETAKEN:
        log.warning("reservation %s had gone back to stock before its commit; taken again", rid)
    elif result.status is CommitStatus.GONE:
        log.error(
            "reservation %s went back to stock (%s) before the backend accepted it and no stock "
            "was left to take again: the backend holds an order flashgate did not count",
            rid,
            result.state,
        )


async def _commit_until_deadline(campaign: Campaign, rid: str, reply: Reply | None) -> None:
    deadline = asyncio.get_running_loop().time() + campaign.settings.forward_deadline
    delay = 0.05
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(delay)
        try:
            await _commit(campaign, rid, reply)
            return
        except StorageError:
            delay = min(delay * 2, 1.0)
    log.error("commit of %s never reached Redis; reconcile against the backend", rid)


async def _replay(campaign: Campaign, rid: str) -> web.Response:
    """The answer to a retry whose Idempotency-Key names a live reservation."""
    record = await campaign.store.reservation(rid)
    if (
        record is not None
        and record.reply is not None
        and record.state in (State.COMMITTED, State.HELD)
    ):
        reply = record.reply
        headers = {"Content-Type": reply.content_type} if reply.content_type else {}
        return _relay(
            UpstreamReply(reply.status, CIMultiDict(headers), reply.body), rid, replayed=True
        )
    state = record.state.value if record else "unknown"
    raise Problem(
        Code.DUPLICATE,
        f"an earlier request with this Idempotency-Key holds reservation {rid} ({state})",
        headers={RESERVATION_HEADER: rid},
        reservation_id=rid,
        state=state,
    )
