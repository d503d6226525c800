"""``GET /reservations/{id}`` on the gateway port: a buyer polls their own reservation
(queue mode answers 202 and points here), and only their own: anyone else's is
"not found", so ids cannot be probed."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.core.carts import Cart
from gateway.core.snapshot import Snapshot
from gateway.problems import Code, Problem, retry_after
from limiter.carts import CartOrder
from limiter.errors import StorageError
from limiter.keys import campaign_of
from limiter.records import Reply, Reservation

PREFIX = "/reservations/"


async def reservation_status(snapshot: Snapshot, request: web.BaseRequest) -> web.Response:
    try:
        user = snapshot.identity(request)
        rid = request.path.removeprefix(PREFIX)
        cart = snapshot.carts.get(campaign_of(rid) or "")
        if cart is not None:
            return web.json_response(await _order_status(cart, rid, user))
        campaign = snapshot.campaigns.get(campaign_of(rid) or "")
        shard = campaign.shard_for(rid) if campaign else None
        record = await shard.store.reservation(rid) if shard else None
        if record is None or record.user_id != user:
            raise Problem(Code.NOT_FOUND, f"you have no reservation {rid}")
    except Problem as problem:
        return problem.response()
    except StorageError:
        return Problem(
            Code.UNAVAILABLE,
            "redis did not answer; try again",
            headers={"Retry-After": retry_after(1, snapshot.settings.gateway.retry_after_jitter)},
        ).response()
    return web.json_response(buyer_document(record))


async def _order_status(cart: Cart, order_id: str, user: str) -> dict[str, Any]:
    """A cart order as its buyer sees it: the order, and each item's own state."""
    order = await cart.store.reservation(order_id)
    if order is None or order.user_id != user:
        raise Problem(Code.NOT_FOUND, f"you have no reservation {order_id}")
    return order_document(order, await cart.items_now(order))


def buyer_document(record: Reservation) -> dict[str, Any]:
    document: dict[str, Any] = {
        "reservation_id": record.id,
        "campaign": record.campaign_id,
        "state": record.state.value,
        "quantity": record.quantity,
        "created_ms": record.created_ms,
        "updated_ms": record.updated_ms,
        "reason": record.reason or None,
    }
    if record.reply is not None:
        document["reply"] = _reply(record.reply)
    return document


def order_document(order: CartOrder, items: list[dict[str, object]]) -> dict[str, Any]:
    """What a buyer polling their order sees (``items``: each item's own state)."""
    document: dict[str, Any] = {
        "reservation_id": order.id,
        "cart": order.cart_id,
        "state": order.state.value,
        "items": items,
        "quantity": sum(item.quantity for item in order.items),
        "created_ms": order.created_ms,
        "updated_ms": order.updated_ms,
        "reason": order.reason or None,
    }
    if order.reply is not None:
        document["reply"] = _reply(order.reply)
    return document


def _reply(reply: Reply) -> dict[str, Any]:
    """The backend's answer kept on a record, as a buyer reads it."""
    return {
        "status": reply.status,
        "content_type": reply.content_type,
        "body": reply.body.decode(errors="replace"),
    }
