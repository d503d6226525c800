"""Typed results of the scripts, instead of raw Redis replies."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import NamedTuple


class ReserveStatus(IntEnum):
    RESERVED = 0  #: units deducted, a reservation created
    DUPLICATE = 1  #: the idempotency key names a live reservation; nothing deducted
    SOLD_OUT = 2  #: nothing left
    INSUFFICIENT = 3  #: something left, fewer units than asked
    LIMIT_EXCEEDED = 4  #: the user would hold more than the per-user limit
    NO_CAMPAIGN = 5  #: the campaign has no counters in Redis


class ReleaseStatus(IntEnum):
    RELEASED = 0  #: units and quota given back now
    ALREADY = 1  #: it had gone back to stock before; nothing changed
    NOT_ALLOWED = 2  #: its state may not be released this way
    NOT_FOUND = 3  #: no such reservation
    NOT_DUE = 4  #: its deadline has not passed yet
    REDELIVER = 5  #: unsettled at its deadline: its kept order is queued for redelivery


class CommitStatus(IntEnum):
    DONE = 0  #: settled now
    ALREADY = 1  #: it was in that state (or beyond) already
    GONE = 2  #: it went back to stock and could not be taken again
    NOT_FOUND = 3  #: no such reservation
    RETAKEN = 4  #: it had gone back to stock; taken again and settled
    NOT_ALLOWED = 5  #: not from its state (a confirm of an order the backend has not answered)


class AdjustStatus(IntEnum):
    DONE = 0  #: stock changed
    BELOW_ZERO = 1  #: refused: available would go below zero
    NO_CAMPAIGN = 2  #: the campaign has no counters in Redis


class ReplayStatus(IntEnum):
    REPLAYED = 0  #: stock taken again, the order queued, the dead letter removed
    NO_LETTER = 1  #: no such dead letter (replayed already, or trimmed)
    NO_RECORD = 2  #: its reservation record is gone
    NOT_RELEASED = 3  #: its reservation is not released (settled or cancelled since)
    NO_CAMPAIGN = 4  #: the campaign has no counters in Redis
    NO_STOCK = 5  #: not enough stock left to take again
    OVER_LIMIT = 6  #: the user would hold more than per_user_limit
    KEY_REBOUND = 7  #: its Idempotency-Key names a fresh attempt now


class Replay(NamedTuple):
    status: ReplayStatus
    reason: str


class DeadLetter(NamedTuple):
    """An order the dispatcher gave up on, kept in the campaign's dead letters stream."""

    id: str
    reservation_id: str
    reason: str
    attempts: int
    payload: bytes


class State(StrEnum):
    RESERVED = "reserved"  #: units deducted; the order is on its way to the backend
    HELD = "held"  #: the backend accepted; waiting for payment until a deadline
    COMMITTED = "committed"  #: sold
    RELEASED = "released"  #: given back: the backend refused or failed
    EXPIRED = "expired"  #: given back: a deadline passed
    CANCELLED = "cancelled"  #: given back by an operator (or an after-sale return)


class Attempt(NamedTuple):
    """One purchase attempt, as handed to reserve.lua."""

    reservation_id: str
    user_id: str
    quantity: int
    idempotency_field: str = ""
    payload: bytes = b""
    #: What the request asked (route, quantity, body), kept with the key's binding.
    fingerprint: str = ""


class Decision(NamedTuple):
    """Outcome of one attempt. ``figure``: available after, or units held (limit)."""

    status: ReserveStatus
    reservation_id: str
    figure: int


class Transition(NamedTuple):
    status: int
    state: str


class CommitItem(NamedTuple):
    """One settlement for commit.lua (see its header)."""

    reservation_id: str
    target: State
    hold_ms: int = 0
    retake: bool = False
    #: The state it may leave: RESERVED for the backend's answer, HELD for a confirm
    #: (either, for an item of a cart confirmed before its hold was applied).
    leavable: State | tuple[State, ...] = State.RESERVED
    reply: Reply | None = None


class ReleaseItem(NamedTuple):
    """One release for release.lua (see its header)."""

    reservation_id: str
    leavable: tuple[State, ...]
    target: State
    reason: str
    only_when_due: bool = False
    #: The order to keep in the dead letters (b"" for none).
    dead_letter: bytes = b""
    #: An undo of a reserve call whose fate is unknown: make sure it cannot act later.
    tombstone: bool = False


class Figures(NamedTuple):
    """A campaign's counters; stock_total == available + reserved + sold."""

    available: int
    reserved: int
    sold: int
    stock_total: int

    @property
    def balanced(self) -> bool:
        return self.stock_total == self.available + self.reserved + self.sold


class Adjustment(NamedTuple):
    status: AdjustStatus
    figures: Figures


class Reply(NamedTuple):
    """The backend's answer, kept so that an idempotent retry can replay it."""

    status: int
    content_type: str
    body: bytes
    #: Its other end-to-end headers, as JSON pairs ("" for none); never Set-Cookie.
    headers: str = ""


class Reservation(NamedTuple):
    id: str
    campaign_id: str
    user_id: str
    quantity: int
    state: State
    mode: str
    created_ms: int
    updated_ms: int
    deadline_ms: int
    reason: str
    attempts: int
    conflict: bool
    reply: Reply | None
    #: The fingerprint of the request its Idempotency-Key was bound with ("" for none).
    fingerprint: str = ""
    #: An item of a cart: its order's id, which decides its fate ("" for none).
    cart_order: str = ""

    def public(self) -> dict[str, object]:
        """The JSON shape of the admin and status APIs."""
        return {
            "id": self.id,
            "campaign": self.campaign_id,
            "user": self.user_id,
            "quantity": self.quantity,
            "state": self.state.value,
            "mode": self.mode,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "deadline_ms": self.deadline_ms or None,
            "reason": self.reason or None,
            "failed_deliveries": self.attempts,
            "conflict": self.conflict,
            "cart_order": self.cart_order or None,
        }
