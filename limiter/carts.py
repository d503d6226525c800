"""One order of several items, each from its own campaign, in Redis.

The items live in their campaigns, whose keys are in other slots (on a cluster, on
other nodes), so no script can reserve them all at once. An order's record, under the
cart's own hash tag, ties them together and is the decision for all of them: it is
opened before any item is reserved (naming the reservation each item will get), moved
to "reserved" only once every item is, and from there to the backend's answer, the
hold's end or a cancel, each move atomic and once (lua/cart_move.lua). The items
follow the order's state afterwards; a sweeper finishes what a dead gateway left
undone. See gateway/core/carts.py for who does what.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

from limiter.keys import CampaignKeys
from limiter.orderbook import OrderBook, RecordFields
from limiter.pipeline import AutoPipeline
from limiter.records import Reply, Transition
from limiter.scripts import Scripts


class CartState(StrEnum):
    RESERVING = "reserving"  #: opened; its items are being reserved
    RESERVED = "reserved"  #: every item reserved; the order is on its way to the backend
    HELD = "held"  #: the backend accepted; waiting for payment until the hold's end
    COMMITTED = "committed"  #: sold, every item
    RELEASED = "released"  #: given back: an item could not be had, or the backend refused
    EXPIRED = "expired"  #: given back: the hold ran out, or reserving took too long
    CANCELLED = "cancelled"  #: given back by an operator


#: The states whose items are given back.
GONE = frozenset({CartState.RELEASED, CartState.EXPIRED, CartState.CANCELLED})


class OpenStatus(IntEnum):
    OPENED = 0  #: a new order, reserving
    DUPLICATE = 1  #: the Idempotency-Key names an earlier order
    REPEATED = 2  #: this order id was opened already


class MoveStatus(IntEnum):
    MOVED = 0  #: the state entered now
    ALREADY = 1  #: it was in that state already
    NOT_ALLOWED = 2  #: not from its state
    NOT_FOUND = 3  #: no such order
    NOT_DUE = 4  #: its deadline has not passed yet
    HOLD_RAN_OUT = 5  #: a confirm after the hold's end


class CartItem(NamedTuple):
    """One item of an order: the reservation it has (or will have) in its campaign."""

    campaign_id: str
    reservation_id: str
    quantity: int

    def encode(self) -> str:
        return f"{self.campaign_id}={self.reservation_id}:{self.quantity}"

    def public(self) -> dict[str, object]:
        return {
            "campaign": self.campaign_id,
            "reservation_id": self.reservation_id,
            "quantity": self.quantity,
        }


def encode_items(items: Iterable[CartItem]) -> str:
    """``campaign=reservation:quantity,...``: the record's items and the backend's
    X-Reservation-Items header alike."""
    return ",".join(item.encode() for item in items)


def decode_items(text: str) -> tuple[CartItem, ...]:
    items = []
    for part in filter(None, text.split(",")):
        campaign_id, _, rest = part.partition("=")
        reservation_id, _, quantity = rest.rpartition(":")
        items.append(CartItem(campaign_id, reservation_id, int(quantity)))
    return tuple(items)


class CartOrder(NamedTuple):
    id: str
    cart_id: str
    user_id: str
    state: CartState
    #: sync, queue, or redelivery (a sync order its gateway never settled)
    mode: str
    items: tuple[CartItem, ...]
    created_ms: int
    updated_ms: int
    deadline_ms: int
    #: A held order: when the hold runs out (ms).
    hold_until_ms: int
    #: Whether its items follow its state yet.
    applied: bool
    reason: str
    attempts: int
    reply: Reply | None
    fingerprint: str

    def public(self) -> dict[str, object]:
        """The JSON shape of the admin API (the buyer's adds each item's state)."""
        return {
            "id": self.id,
            "cart": self.cart_id,
            "user": self.user_id,
            "state": self.state.value,
            "mode": self.mode,
            "items": [
                {
                    "campaign": i.campaign_id,
                    "reservation_id": i.reservation_id,
                    "quantity": i.quantity,
                }
                for i in self.items
            ],
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "deadline_ms": self.deadline_ms or None,
            "hold_until_ms": self.hold_until_ms or None,
            "settled": self.applied,
            "reason": self.reason or None,
            "failed_deliveries": self.attempts,
        }


class Move(NamedTuple):
    """One state change of an order (see lua/cart_move.lua)."""

    leavable: tuple[CartState, ...]
    target: CartState
    #: Only once its deadline (a hold: the hold's end) has passed.
    due: bool = False
    #: Its deadline after the move, ms from now (0: none).
    deadline_ms: int = 0
    #: Entering held: how long the hold lasts, ms.
    hold_ms: int = 0
    #: The order goes to the orders stream, for the dispatchers.
    hand_over: bool = False
    reason: str = ""
    reply: Reply | None = None
    #: The order to keep in the dead letters (b"" for none).
    dead_letter: bytes = b""


@dataclass(frozen=True, slots=True)
class CartPolicy:
    """The cart settings the scripts need."""

    #: How long reserving an order's items may take before a sweeper rolls it back.
    reserve_window_ms: int
    ledger_max_length: int
    mode: str = "sync"


class CartStore(OrderBook):
    """All Redis operations of one cart's orders."""

    def __init__(
        self, pipe: AutoPipeline, scripts: Scripts, keys: CampaignKeys, policy: CartPolicy
    ) -> None:
        super().__init__(pipe, scripts, keys)
        self.policy = policy

    async def open(
        self,
        order_id: str,
        user_id: str,
        items: Sequence[CartItem],
        payload: bytes,
        *,
        idempotency_field: str,
        fingerprint: str,
        actor: str,
    ) -> tuple[OpenStatus, str]:
        """Open an order before its items are reserved: (status, the order's id, or the
        earlier order's its Idempotency-Key names)."""
        k = self.keys
        reply = await self.pipe.script(
            self.scripts.cart_open,
            [k.state, k.idempotency, k.index, k.deadlines, k.ledger, k.reservation(order_id)],
            [
                order_id,
                user_id,
                encode_items(items),
                payload,
                self.policy.mode,
                idempotency_field,
                fingerprint,
                self.policy.reserve_window_ms,
                self.policy.ledger_max_length,
                k.events,
                actor,
            ],
            "open a cart order",
        )
        return OpenStatus(int(reply[0])), reply[1].decode()

    async def move(self, order_id: str, move: Move, actor: str) -> Transition:
        """Change an order's state; see cart_move.lua for the statuses."""
        k = self.keys
        reply = move.reply
        args: list[str | int | bytes] = [
            order_id,
            ",".join(move.leavable),
            move.target.value,
            "due" if move.due else "",
            move.deadline_ms,
            move.hold_ms,
            "hand-over" if move.hand_over else "",
            move.reason,
            actor,
            self.policy.ledger_max_length,
            k.events,
            str(reply.status) if reply else "",
            reply.content_type if reply else "",
            reply.body if reply else b"",
            reply.headers if reply else "",
            move.dead_letter,
        ]
        keys = [
            k.state,
            k.idempotency,
            k.deadlines,
            k.ledger,
            k.orders,
            k.dead_letters,
            k.reservation(order_id),
        ]
        result = await self.pipe.script(self.scripts.cart_move, keys, args, "move a cart order")
        return Transition(MoveStatus(int(result[0])), result[1].decode())

    async def settled(self, order_id: str, state: CartState) -> bool:
        """Every item follows the order's ``state`` now (see cart_settled.lua)."""
        k = self.keys
        reply = await self.pipe.script(
            self.scripts.cart_settled,
            [k.state, k.deadlines, k.reservation(order_id)],
            [order_id, state.value, k.events],
            "settle a cart order",
        )
        return int(reply) == 1

    async def reservation(self, order_id: str) -> CartOrder | None:
        """The order's record (named so for the dispatcher, which reads reservations and
        orders alike)."""
        raw = await self.pipe.call(
            "HGETALL", self.keys.reservation(order_id), what="read a cart order"
        )
        return parse_order(order_id, self.campaign_id, raw) if raw else None

    async def order_ids(self, start: int = 0, count: int = 500) -> list[str]:
        """Order ids, oldest first (the index), ``count`` from ``start``."""
        reply = await self.pipe.call(
            "ZRANGE", self.keys.index, start, start + count - 1, what="read cart orders"
        )
        return [raw.decode() for raw in reply]


def parse_order(order_id: str, cart_id: str, raw: Mapping[Any, Any]) -> CartOrder:
    f = RecordFields(raw)
    return CartOrder(
        id=order_id,
        cart_id=cart_id,
        user_id=f.text("user"),
        state=CartState(f.text("state")),
        mode=f.text("mode"),
        items=decode_items(f.text("items")),
        created_ms=f.number("created_ms"),
        updated_ms=f.number("updated_ms"),
        deadline_ms=f.number("deadline_ms"),
        hold_until_ms=f.number("hold_until"),
        applied=bool(f.number("applied")),
        reason=f.text("reason"),
        attempts=f.number("attempts"),
        reply=f.reply(),
        fingerprint=f.text("fp"),
    )
