"""The purchase of a cart: one order of several items, each from its own campaign,
all or nothing (gateway/core/carts.py has the steps and what happens on a crash).

The buyer sends ``{"items": [{"campaign": "phone-1111", "quantity": 1}, ...]}``.
Everything about the body is checked before Redis is asked anything; then the order is
opened, every item is reserved in its own campaign at once, and either the order goes
to the backend as one (with X-Reservation-Id, X-Campaign-Id and X-Reservation-Items)
or every item that was taken is given back before the buyer hears which item failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, NamedTuple

from aiohttp import web

from gateway.admission.clientip import proxy_headers
from gateway.core.campaigns import Campaign, Shard
from gateway.core.carts import Cart
from gateway.core.snapshot import Snapshot
from gateway.edge.answers import (
    RESERVATION_HEADER,
    Answer,
    Decided,
    queued,
    redis_failed,
    relay,
    via,
)
from gateway.edge.buyer import (
    IDEMPOTENCY_HEADER,
    fingerprint,
    idempotency_key,
    json_object,
    read_body,
)
from gateway.edge.context import Edge
from gateway.edge.purchase import decide
from gateway.forwarding.settle import accepted, replayed_headers
from gateway.forwarding.upstream import OutboundRequest, UpstreamError, UpstreamReply
from gateway.problems import Code, Problem, retry_after
from gateway.stats import DECISION_SECONDS
from limiter.carts import CartItem, CartState, Move, OpenStatus, encode_items
from limiter.carts import MoveStatus as Moved
from limiter.errors import StorageError
from limiter.keys import idempotency_field, new_reservation_id
from limiter.records import Attempt, Decision, ReserveStatus

ITEMS_HEADER = "X-Reservation-Items"
LIVE = (CartState.RESERVED, CartState.HELD, CartState.COMMITTED)
SETTLED = (CartState.HELD, CartState.COMMITTED)
#: A refused item's problem code, by reserve.lua's status.
REFUSALS = {
    ReserveStatus.SOLD_OUT: Code.SOLD_OUT,
    ReserveStatus.INSUFFICIENT: Code.INSUFFICIENT_STOCK,
    ReserveStatus.LIMIT_EXCEEDED: Code.LIMIT_EXCEEDED,
}


class Line(NamedTuple):
    """One item of the buyer's cart, checked: its campaign, the user's home shard there."""

    campaign: Campaign
    home: Shard
    quantity: int


async def buy_cart(edge: Edge, snapshot: Snapshot, cart: Cart, request: web.BaseRequest) -> Answer:
    started = time.perf_counter()
    user = ""
    limits = None
    jitter = snapshot.settings.gateway.retry_after_jitter
    try:
        user = snapshot.identity(request)
        key = idempotency_key(request)
        if not key and cart.settings.require_idempotency_key:
            raise Problem(
                Code.IDEMPOTENCY_KEY_REQUIRED,
                f"cart {cart.id} needs an {IDEMPOTENCY_HEADER} header (one per order, the same "
                "on every retry of it)",
            )
        g = snapshot.settings.gateway
        body = await read_body(request, g.max_body_bytes, g.body_timeout)
        lines = read_cart(body, cart, user, snapshot)
        field = idempotency_field(user, key) if key else ""
        units = sum(line.quantity for line in lines)
        asked = fingerprint(str(cart.settings.route), units, body) if key else ""
        _refuse_outside_windows(lines)
        short = [line for line in lines if line.campaign.id in edge.watch.sold_out]
        if short and key and (earlier := await cart.store.bound_reservation(field)):
            return Answer("replayed", await replay_order(cart, earlier, asked, jitter), user)
        if short:
            raise _refusal(lines, {line.campaign.id: Code.SOLD_OUT for line in short}, {})
        for line in lines:
            limits = await line.campaign.shaper.admit(request, user, retry=bool(key)) or limits
        code, response = await _order(
            edge, snapshot, cart, request, user, body, lines, field, asked
        )
        DECISION_SECONDS.labels(cart.id).observe(time.perf_counter() - started)
    except Problem as problem:
        code, response = problem.code.value, problem.response()
    except StorageError as exc:
        code, response = redis_failed(
            f"cart {cart.id}",
            jitter,
            exc,
            "redis could not decide the order; whatever it reserved is being given back, "
            "try again in a moment",
        )
    if limits:
        response.headers.update(limits)
    return Answer(code, response, user)


def read_cart(body: bytes, cart: Cart, user: str, snapshot: Snapshot) -> list[Line]:
    """The items asked for, each checked against the cart (a 400 naming the item's path
    otherwise)."""
    document = json_object(body) if body.strip() else {}
    items = document.get("items")
    if not isinstance(items, list):
        raise _bad("items", "must be a list of {campaign, quantity}")
    most = cart.settings.most_items
    if not 1 <= len(items) <= most:
        raise _bad("items", f"must have 1 to {most} items, got {len(items)}")
    lines: list[Line] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        at = f"items[{i}]"
        if not isinstance(item, dict):
            raise _bad(at, "must be an object {campaign, quantity}")
        campaign_id = item.get("campaign")
        if not isinstance(campaign_id, str):
            raise _bad(f"{at}.campaign", "must be a campaign id")
        campaign = cart.campaigns.get(campaign_id)
        if campaign is None:
            sold = ", ".join(cart.campaigns)
            if campaign_id in snapshot.campaigns:
                reason = f"{campaign_id!r} is not sold in cart {cart.id} (it sells {sold})"
            else:
                reason = f"there is no campaign {campaign_id!r} (cart {cart.id} sells {sold})"
            raise _bad(f"{at}.campaign", reason)
        if campaign_id in seen:
            raise _bad(
                f"{at}.campaign", f"{campaign_id!r} is at items[{seen[campaign_id]}] already"
            )
        seen[campaign_id] = i
        quantity = item.get("quantity", 1)
        most_units = campaign.settings.max_quantity
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            raise _bad(f"{at}.quantity", f"must be an integer, got {json.dumps(quantity)}")
        if not 1 <= quantity <= most_units:
            raise _bad(f"{at}.quantity", f"must be between 1 and {most_units}, got {quantity}")
        lines.append(Line(campaign, campaign.home(user), quantity))
    return lines


def _bad(path: str, reason: str) -> Problem:
    return Problem(Code.BAD_REQUEST, f"{path}: {reason}", path=path)


def _refuse_outside_windows(lines: list[Line]) -> None:
    for line in lines:
        outside = line.campaign.shaper.window()
        if outside is not None:
            raise _refusal(lines, {line.campaign.id: outside.code}, {})


def _refusal(
    lines: list[Line], refused: dict[str, Code], figures: dict[str, dict[str, Any]]
) -> Problem:
    """The order refused: named by its first refused item (``campaign`` and its code),
    with every item listed (``ok``: not what failed; whatever it had is given back)."""
    items = []
    for line in lines:
        cid = line.campaign.id
        code = refused.get(cid)
        items.append(
            {"campaign": cid, "quantity": line.quantity, "code": code.value if code else "ok"}
            | figures.get(cid, {})
        )
    first = next(line.campaign.id for line in lines if line.campaign.id in refused)
    code = refused[first]
    why = {
        Code.SOLD_OUT: "is sold out",
        Code.INSUFFICIENT_STOCK: "has fewer units left than asked",
        Code.LIMIT_EXCEEDED: "would put you above its per-user limit",
        Code.NOT_STARTED: "has not started",
        Code.ENDED: "has ended",
    }.get(code, "could not be reserved")
    return Problem(
        code,
        f"{first} {why}; nothing of this order was reserved",
        campaign=first,
        items=items,
        **figures.get(first, {}),
    )


async def _order(
    edge: Edge,
    snapshot: Snapshot,
    cart: Cart,
    request: web.BaseRequest,
    user: str,
    body: bytes,
    lines: list[Line],
    field: str,
    asked: str,
) -> Decided:
    """Open the order, reserve every item, and send it on or give it all back."""
    order_id = new_reservation_id(cart.id)
    items = [
        CartItem(
            line.campaign.id,
            new_reservation_id(
                line.campaign.id, line.home.index if line.campaign.sharded else None
            ),
            line.quantity,
        )
        for line in lines
    ]
    outbound = _outbound(snapshot, cart, request, body, order_id, user, items)
    status, earlier = await cart.store.open(
        order_id,
        user,
        items,
        outbound.encode(),
        idempotency_field=field,
        fingerprint=asked,
        actor=cart.actor,
    )
    jitter = snapshot.settings.gateway.retry_after_jitter
    if status is OpenStatus.DUPLICATE:
        return "replayed", await replay_order(cart, earlier, asked, jitter)
    attempts = [Attempt(i.reservation_id, user, i.quantity, "", order_id.encode()) for i in items]
    outcomes = await asyncio.gather(
        *(
            decide(edge, line.campaign, line.home, attempt, line.home.cart_batcher)
            for line, attempt in zip(lines, attempts, strict=True)
        ),
        return_exceptions=True,
    )
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    decisions = [o for o in outcomes if isinstance(o, Decision)]
    if failed or any(d.status is not ReserveStatus.RESERVED for d in decisions):
        await cart.settle.roll_back(order_id, _why(lines, outcomes))
        if failed:
            raise failed[0]
        raise _refused(edge, lines, decisions)
    return await _send(edge, cart, order_id, items, outbound, jitter)


def _why(lines: list[Line], outcomes: list[Decision | BaseException]) -> str:
    for line, outcome in zip(lines, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            return f"{line.campaign.id}: redis could not decide"
        if outcome.status is not ReserveStatus.RESERVED:
            return f"{line.campaign.id}: {outcome.status.name.lower().replace('_', ' ')}"
    return ""


def _refused(edge: Edge, lines: list[Line], decisions: list[Decision]) -> Problem:
    refused: dict[str, Code] = {}
    figures: dict[str, dict[str, Any]] = {}
    for line, decision in zip(lines, decisions, strict=True):
        cid = line.campaign.id
        code = REFUSALS.get(decision.status)
        if decision.status is ReserveStatus.RESERVED:
            continue
        if code is None:  # a tombstone or missing counters: Redis could not decide it
            raise StorageError(
                f"item {cid} of the order: {decision.status.name}", maybe_applied=False
            )
        refused[cid] = code
        if code is Code.SOLD_OUT:
            edge.watch.mark_sold_out(cid)
        elif code is Code.INSUFFICIENT_STOCK:
            figures[cid] = {"available": decision.figure}
        elif code is Code.LIMIT_EXCEEDED:
            limit = line.campaign.settings.per_user_limit
            figures[cid] = {"limit": limit, "held": decision.figure}
    return _refusal(lines, refused, figures)


def _outbound(
    snapshot: Snapshot,
    cart: Cart,
    request: web.BaseRequest,
    body: bytes,
    order_id: str,
    user: str,
    items: list[CartItem],
) -> OutboundRequest:
    extra = {
        RESERVATION_HEADER: order_id,
        "X-Cart-Id": cart.id,
        "X-Campaign-Id": ",".join(item.campaign_id for item in items),
        ITEMS_HEADER: encode_items(items),
        "X-User-Id": user,
        "X-Delivery-Attempt": "1",
        "Via": via(request),
        **proxy_headers(request, snapshot.settings.gateway.trusted_proxies),
    }
    return OutboundRequest.of(request.method, request.path_qs, request.headers, body, extra)


async def _send(
    edge: Edge,
    cart: Cart,
    order_id: str,
    items: list[CartItem],
    outbound: OutboundRequest,
    jitter: float,
) -> Decided:
    """Every item is reserved: the order is, and goes to the backend (sync) or to the
    orders stream (queue) in the same step."""
    s = cart.settings
    deadline_ms = round(s.forward_deadline * 1000)
    move = Move((CartState.RESERVING,), CartState.RESERVED, deadline_ms=deadline_ms)
    try:
        result = await cart.store.move(order_id, move, cart.actor)
    except StorageError:
        # reserved or not, nobody can tell the buyer, and nothing was sent: it goes back
        await cart.settle.roll_back(order_id, "redis did not confirm the order", unheard=True)
        raise
    if result.status is not Moved.MOVED:  # a sweeper rolled it back: reserving took too long
        raise Problem(
            Code.UNAVAILABLE,
            f"reserving the order took too long and it was given back ({result.state}); "
            "try again in a moment",
            headers={"Retry-After": retry_after(1, jitter)},
        )
    headers = {ITEMS_HEADER: encode_items(items)}
    if s.forward == "sync":
        return await _forward(edge, cart, order_id, outbound, headers)
    # the buyer is told 202: the order goes to the dispatchers (should Redis not
    # confirm that, the sweeper hands it over at its deadline)
    hand_over = Move((CartState.RESERVED,), CartState.RESERVED, hand_over=True)
    with contextlib.suppress(StorageError):
        await cart.store.move(order_id, hand_over, cart.actor)
    return "queued", queued(order_id, CartState.RESERVED, headers=headers)


async def _forward(
    edge: Edge, cart: Cart, order_id: str, outbound: OutboundRequest, headers: dict[str, str]
) -> Decided:
    # the backend as configured now (a reload may have replaced this request's)
    upstream = edge.live.current.carts.get(cart.id, cart).upstream
    settle = cart.settle
    try:
        reply = await upstream.send(outbound)
    except UpstreamError as exc:
        code = Code.UPSTREAM_TIMEOUT if exc.timed_out else Code.UPSTREAM_FAILED
        await settle.give_back(order_id, code.value)
        raise Problem(
            code,
            f"{exc}; every item of the order is released",
            headers={RESERVATION_HEADER: order_id, **headers},
            reservation_id=order_id,
        ) from None
    except Exception:  # a fault of this process: the buyer's 500 must not keep the units
        await settle.give_back(order_id, "the gateway failed to forward")
        raise
    if accepted(reply.status):
        await settle.settle_accepted(order_id, reply)
        return "ok", _relayed(reply, order_id, headers)
    await settle.give_back(order_id, f"upstream answered {reply.status}")
    if reply.status >= 500:
        raise Problem(
            Code.UPSTREAM_FAILED,
            f"the order backend answered {reply.status}; every item of the order is released",
            headers={RESERVATION_HEADER: order_id, **headers},
            reservation_id=order_id,
            upstream_status=reply.status,
        )
    return "upstream-refused", _relayed(reply, order_id, headers)


def _relayed(
    reply: UpstreamReply, order_id: str, headers: dict[str, str], replayed: bool = False
) -> web.Response:
    response = relay(reply, order_id, replayed)
    response.headers.update(headers)
    return response


async def replay_order(cart: Cart, order_id: str, asked: str, jitter: float) -> web.Response:
    """The answer to a retry whose Idempotency-Key names an order; 422 when the key was
    bound to another request (``asked``: this one's fingerprint)."""
    order = await cart.store.reservation(order_id)
    if order is not None and order.fingerprint and asked and order.fingerprint != asked:
        raise Problem(
            Code.IDEMPOTENCY_KEY_MISMATCH,
            f"this {IDEMPOTENCY_HEADER} was used for another request (order {order_id}); "
            "use a new key for a new order",
        )
    headers = {ITEMS_HEADER: encode_items(order.items)} if order is not None else {}
    if order is not None and cart.settings.forward == "queue" and order.state in LIVE:
        return queued(order_id, order.state, replayed=True, headers=headers)
    if order is not None and order.reply is not None and order.state in SETTLED:
        reply = order.reply
        kept = UpstreamReply(reply.status, replayed_headers(reply), reply.body)
        return _relayed(kept, order_id, headers, replayed=True)
    state = order.state.value if order is not None else "unknown"
    raise Problem(
        Code.DUPLICATE,
        f"an earlier request with this {IDEMPOTENCY_HEADER} holds order {order_id} ({state})",
        headers={RESERVATION_HEADER: order_id, "Retry-After": retry_after(1, jitter)},
        reservation_id=order_id,
        state=state,
    )
