"""The purchase flow of one request, from the sale window to the backend's answer.

Order matters: the cheapest refusals come first (window, local sold-out flag),
then the buyer's input (no Redis), the edge limits, one atomic decision in Redis,
and the backend. The order for the backend travels with the decision: Redis keeps
it on the winner's record. In sync mode the gateway forwards it at once (a
reservation the backend did not accept goes back to stock before the buyer hears
about it); in queue mode the gateway hands it over to the orders stream as the
buyer gets 202.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from gateway.admission.clientip import proxy_headers
from gateway.config import GatewaySettings
from gateway.core.campaigns import Campaign, Shard
from gateway.core.snapshot import Snapshot
from gateway.edge.answers import (
    RESERVATION_HEADER,
    Answer,
    Decided,
    queued,
    redis_failed,
    relay,
    unavailable,
    via,
)
from gateway.edge.buyer import (
    IDEMPOTENCY_HEADER,
    Order,
    fingerprint,
    idempotency_key,
    read_order,
)
from gateway.edge.context import Edge
from gateway.forwarding.settle import accepted, replayed_headers
from gateway.forwarding.upstream import OutboundRequest, UpstreamError, UpstreamReply
from gateway.problems import Code, Problem, retry_after
from gateway.stats import DECISION_SECONDS
from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.keys import idempotency_field, new_reservation_id
from limiter.logs import Throttled
from limiter.records import Attempt, Decision, Reservation, ReserveStatus, State

log = logging.getLogger(__name__)
throttled = Throttled(log)


SOLD_OUT = Code.SOLD_OUT.value
SETTLED = (State.COMMITTED, State.HELD)
LIVE = (State.RESERVED, *SETTLED)


async def purchase(
    edge: Edge, snapshot: Snapshot, campaign: Campaign, request: web.BaseRequest
) -> Answer:
    outside = campaign.shaper.window()
    if outside is not None:
        return Answer(outside.code.value, outside.response(), local=True)
    if campaign.id in edge.watch.sold_out:
        if IDEMPOTENCY_HEADER not in request.headers:
            return Answer(SOLD_OUT, campaign.sold_out.response(), local=True)
        return await _retry_after_sold_out(edge, snapshot, campaign, request)
    started = time.perf_counter()
    user = ""
    gateway = snapshot.settings.gateway
    limits = None  # RateLimit fields, once the edge limits let the request through
    room = campaign.room
    try:
        user = snapshot.identity(request)
        if room is not None:  # a waiting room's pass, checked before anything else is read
            room.read_pass(request.headers, user)
        key = idempotency_key(request)
        if not key and campaign.settings.require_idempotency_key:
            raise Problem(
                Code.IDEMPOTENCY_KEY_REQUIRED,
                f"campaign {campaign.id} needs an {IDEMPOTENCY_HEADER} header (one per purchase, "
                "the same on every retry of it)",
            )
        order = await read_order(
            request, campaign.settings.max_quantity, gateway.max_body_bytes, gateway.body_timeout
        )
        limits = await campaign.shaper.admit(request, user, retry=bool(key))
        home = campaign.home(user)
        rid = new_reservation_id(campaign.id, home.index if campaign.sharded else None)
        # The order goes to Redis with the decision: a winner's is kept on its record in
        # the same atomic step, so no crash can lose it.
        outbound = _outbound(gateway, campaign, request, rid, user, order)
        field = idempotency_field(user, key) if key else ""
        asked = fingerprint(str(campaign.settings.route), order.quantity, order.body) if key else ""
        attempt = Attempt(rid, user, order.quantity, field, outbound.encode(), asked)
        if room is not None:  # Redis's word that the pass was not withdrawn meanwhile
            await room.confirm_pass(user)
        decision = await decide(edge, campaign, home, attempt)
        DECISION_SECONDS.labels(campaign.id).observe(time.perf_counter() - started)
        if room is not None and decision.status is ReserveStatus.RESERVED:
            room.pass_used(user)
        if decision.status is ReserveStatus.RESERVED and campaign.settings.forward == "sync":
            code, response = await _forward(edge, campaign, rid, outbound)
        else:
            code, response = await _outcome(edge, campaign, attempt, decision)
    except Problem as problem:
        code, response = problem.code.value, problem.response()
    except StorageError as exc:
        code, response = redis_failed(
            campaign.id,
            campaign.shaper.jitter,
            exc,
            "redis did not confirm a decision in time: whatever it reserved is being given "
            "back; try again in a moment"
            if exc.maybe_applied
            else "redis could not decide; nothing was reserved or charged",
        )
    if limits:
        response.headers.update(limits)
    return Answer(code, response, user)


#: A shard that cannot fill an attempt pulls stock from the others this often at most.
PULLS = 8
#: Units on their way between shards: ask again this soon.
IN_FLIGHT_WAIT = 0.01
SHORT = (ReserveStatus.SOLD_OUT, ReserveStatus.INSUFFICIENT)


async def decide(
    edge: Edge,
    campaign: Campaign,
    home: Shard,
    attempt: Attempt,
    batcher: TickBatcher[Attempt, Decision] | None = None,
) -> Decision:
    """The decision of the buyer's home shard (through ``batcher``: the shard's own, or
    its batcher of cart items); one of several shards that has too little pulls units
    from the others and asks again, so that a buyer is told sold-out (or
    insufficient-stock) only when no shard has (enough) left. Units still left after
    every pull (other buyers kept taking what came in) are a 503: try again."""
    batcher = batcher or home.batcher
    decision = await batcher.submit(attempt)
    if not campaign.sharded or decision.status not in SHORT:
        return decision
    for _ in range(PULLS):
        if not await edge.rebalancer.pull(campaign, home, attempt.quantity):
            if not await edge.rebalancer.in_flight(campaign):
                break
            await asyncio.sleep(IN_FLIGHT_WAIT)  # units between two shards: they land soon
        decision = await batcher.submit(attempt)
        if decision.status not in SHORT:
            return decision
    left = sum([(await shard.store.balance())[0] for shard in campaign.shards])
    left += await edge.rebalancer.in_flight(campaign)
    if left >= attempt.quantity:
        raise Problem(
            Code.UNAVAILABLE,
            f"campaign {campaign.id} has units left, moving between its shards; try again "
            "in a moment",
            headers={"Retry-After": retry_after(1, campaign.shaper.jitter)},
        )
    status = ReserveStatus.SOLD_OUT if left == 0 else ReserveStatus.INSUFFICIENT
    return Decision(status, attempt.reservation_id, left)


def _shard(campaign: Campaign, rid: str) -> Shard:
    """The shard a reservation of this campaign lives in (the ids are the gateway's)."""
    shard = campaign.shard_for(rid)
    if shard is None:
        raise Problem(Code.NOT_FOUND, f"no reservation {rid}")
    return shard


async def _retry_after_sold_out(
    edge: Edge, snapshot: Snapshot, campaign: Campaign, request: web.BaseRequest
) -> Answer:
    """Sold out, but a request with an Idempotency-Key may be a winner's retry, owed its
    outcome. A user who holds no unit has nothing to be owed (a released reservation
    frees its key): sold-out from memory, once the holders are known. A holder's key is
    read (never the reserve script, never a deduction); a key that names nothing gets
    sold-out."""
    user = ""
    response: web.StreamResponse
    try:
        user = snapshot.identity(request)
        key = idempotency_key(request)
        holders = edge.watch.holders_of(campaign.id)
        if holders is not None and user not in holders:
            return Answer(SOLD_OUT, campaign.sold_out.response(), user, local=True)
        field = idempotency_field(user, key)
        rid = await campaign.home(user).store.bound_reservation(field)
        if rid is None:
            return Answer(SOLD_OUT, campaign.sold_out.response(), user)
        code, response = (
            "replayed",
            await _replay(campaign, rid, await _fingerprint(snapshot, campaign, request)),
        )
    except Problem as problem:
        code, response = problem.code.value, problem.response()
    except StorageError as exc:
        code, response = redis_failed(
            campaign.id,
            campaign.shaper.jitter,
            exc,
            "redis could not be asked for the earlier outcome",
        )
    return Answer(code, response, user)


async def _fingerprint(snapshot: Snapshot, campaign: Campaign, request: web.BaseRequest) -> str:
    """A retry's fingerprint, its body read as a purchase's would be."""
    g, s = snapshot.settings.gateway, campaign.settings
    order = await read_order(request, s.max_quantity, g.max_body_bytes, g.body_timeout)
    return fingerprint(str(s.route), order.quantity, order.body)


def _outbound(
    gateway: GatewaySettings,
    campaign: Campaign,
    request: web.BaseRequest,
    rid: str,
    user: str,
    order: Order,
) -> OutboundRequest:
    extra = {
        RESERVATION_HEADER: rid,
        "X-Campaign-Id": campaign.id,
        "X-User-Id": user,
        "X-Quantity": str(order.quantity),
        "X-Delivery-Attempt": "1",
        "Via": via(request),
        **proxy_headers(request, gateway.trusted_proxies),
    }
    return OutboundRequest.of(request.method, request.path_qs, request.headers, order.body, extra)


async def _outcome(edge: Edge, campaign: Campaign, attempt: Attempt, decision: Decision) -> Decided:
    match decision.status:
        case ReserveStatus.RESERVED:
            rid = attempt.reservation_id
            try:
                await _shard(campaign, rid).store.hand_over(rid)
            except StorageError as exc:  # the sweeper hands it over at its deadline
                throttled.log(
                    logging.WARNING,
                    f"hand-over:{campaign.id}",
                    "order %s waits for its forward_deadline: %s",
                    rid,
                    exc,
                )
            return "queued", queued(rid, State.RESERVED)
        case ReserveStatus.DUPLICATE:
            return "replayed", await _replay(campaign, decision.reservation_id, attempt.fingerprint)
        case ReserveStatus.SOLD_OUT:
            edge.watch.mark_sold_out(campaign.id)
            return SOLD_OUT, campaign.sold_out.response()
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
            throttled.log(
                logging.ERROR,
                f"missing:{campaign.id}",
                "campaign %s has no counters in Redis: did Redis lose its data? "
                "(restore it, or restart the gateways to create the campaign afresh)",
                campaign.id,
            )
            return unavailable(
                f"campaign {campaign.id} is not initialised in Redis", campaign.shaper.jitter
            )


async def _forward(edge: Edge, campaign: Campaign, rid: str, outbound: OutboundRequest) -> Decided:
    # The backend as configured now: a reload may have replaced the one this request
    # started with (and closes the old one soon).
    upstream = edge.live.current.campaigns.get(campaign.id, campaign).upstream
    try:
        reply = await upstream.send(outbound)
    except UpstreamError as exc:
        code = Code.UPSTREAM_TIMEOUT if exc.timed_out else Code.UPSTREAM_FAILED
        await _shard(campaign, rid).settle.give_back(rid, code.value)
        raise Problem(
            code,
            f"{exc}; the reservation is released",
            headers={RESERVATION_HEADER: rid},
            reservation_id=rid,
        ) from None
    except Exception:  # a fault of this process: the buyer's 500 must not keep the units
        await _shard(campaign, rid).settle.give_back(rid, "the gateway failed to forward")
        raise
    if accepted(reply.status):
        await _shard(campaign, rid).settle.settle_accepted(rid, reply)
        return "ok", relay(reply, rid)
    await _shard(campaign, rid).settle.give_back(rid, f"upstream answered {reply.status}")
    if reply.status >= 500:
        raise Problem(
            Code.UPSTREAM_FAILED,
            f"the order backend answered {reply.status}; the reservation is released",
            headers={RESERVATION_HEADER: rid},
            reservation_id=rid,
            upstream_status=reply.status,
        )
    return "upstream-refused", relay(reply, rid)


async def _replay(campaign: Campaign, rid: str, asked: str) -> web.Response:
    """The answer to a retry whose Idempotency-Key names a live reservation; 422 when
    the key was bound to another request (``asked``: this one's fingerprint)."""
    store = _shard(campaign, rid).store
    record = await store.reservation(rid)
    if record is not None and record.fingerprint and asked and record.fingerprint != asked:
        raise Problem(
            Code.IDEMPOTENCY_KEY_MISMATCH,
            f"this {IDEMPOTENCY_HEADER} was used for another request (reservation {rid}); "
            "use a new key for a new purchase",
        )
    if record is not None and record.mode == "queue" and record.state is State.RESERVED:
        # The first request may have been told 503 before its order was handed over;
        # this buyer is told 202, so it is now (the undo then leaves it alone).
        try:
            if not await store.hand_over(rid):  # settled meanwhile: as it is now
                record = await store.reservation(rid)
        except StorageError:  # handed over or not: only a retry can tell, never "given back"
            raise Problem(
                Code.UNAVAILABLE,
                f"redis did not confirm reservation {rid}; retry with the same "
                "Idempotency-Key to learn its outcome",
                headers={
                    "Retry-After": retry_after(1, campaign.shaper.jitter),
                    RESERVATION_HEADER: rid,
                },
                reservation_id=rid,
            ) from None
    if record is not None and record.mode == "queue" and record.state in LIVE:
        return queued(rid, record.state, replayed=True)
    if record is not None and record.reply is not None and record.state in SETTLED:
        return _replayed_reply(record, rid)
    state = record.state.value if record else "unknown"
    raise Problem(
        Code.DUPLICATE,
        f"an earlier request with this Idempotency-Key holds reservation {rid} ({state})",
        headers={RESERVATION_HEADER: rid, "Retry-After": retry_after(1, campaign.shaper.jitter)},
        reservation_id=rid,
        state=state,
    )


def _replayed_reply(record: Reservation, rid: str) -> web.Response:
    assert record.reply is not None
    reply = record.reply
    return relay(
        UpstreamReply(reply.status, replayed_headers(reply), reply.body), rid, replayed=True
    )
