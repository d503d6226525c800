"""Redis key layout of a campaign.

Every key of one campaign carries the same hash tag, ``{<campaign id>}``, so that
all of them live in one Redis Cluster slot and every script touches one slot.
Key names are built here and nowhere else; scripts receive them through KEYS.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from gateway.config.values import CAMPAIGN_ID

#: Reservation ids are ``<campaign id>.<token>``.
RESERVATION_ID = re.compile(rf"^({CAMPAIGN_ID.pattern.strip('^$')})\.([0-9a-f]{{20}})$")


@dataclass(frozen=True, slots=True)
class CampaignKeys:
    """Names of one campaign's keys (and its pub/sub channel)."""

    campaign_id: str
    prefix: str = "fg"

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.campaign_id}}}"

    @property
    def state(self) -> str:
        """Hash: stock_total, available, reserved, sold."""
        return f"{self.base}:state"

    @property
    def users(self) -> str:
        """Hash: user id -> units the user holds (reserved, held or sold)."""
        return f"{self.base}:users"

    @property
    def idempotency(self) -> str:
        """Hash: idempotency field (user + key) -> reservation id."""
        return f"{self.base}:idem"

    @property
    def ledger(self) -> str:
        """Stream: one entry per state change, with the figures before and after."""
        return f"{self.base}:ledger"

    @property
    def index(self) -> str:
        """Sorted set: every reservation id, scored by creation time (ms)."""
        return f"{self.base}:rids"

    @property
    def deadlines(self) -> str:
        """Sorted set: reservation id -> time (ms) after which it goes back to stock."""
        return f"{self.base}:deadlines"

    @property
    def orders(self) -> str:
        """Stream: orders waiting for the dispatcher (queue mode)."""
        return f"{self.base}:orders"

    @property
    def dead_letters(self) -> str:
        """Stream: orders the dispatcher gave up on."""
        return f"{self.base}:dead"

    @property
    def delivery_slots(self) -> str:
        """Sorted set: deliveries in flight to the backend (holder -> expiry, ms)."""
        return f"{self.base}:inflight"

    @property
    def bucket(self) -> str:
        """Hash: the campaign's distributed token bucket."""
        return f"{self.base}:bucket"

    @property
    def client_buckets(self) -> str:
        """Key prefix of per-client buckets (one small hash per client)."""
        return f"{self.base}:cb:"

    @property
    def admission(self) -> str:
        """Hash: admission-ratio budget (requests let through to the deduction stage)."""
        return f"{self.base}:admit"

    @property
    def events(self) -> str:
        """Pub/sub channel for sold-out and restock notices."""
        return f"{self.base}:events"

    def reservation(self, reservation_id: str) -> str:
        """Hash holding one reservation record."""
        return f"{self.base}:r:{reservation_id.rpartition('.')[2]}"

    @property
    def queue(self) -> QueueKeys:
        """The waiting room's keys, under this campaign's hash tag."""
        return QueueKeys(f"{self.base}:q")


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Names of one campaign's waiting-room keys. They share the campaign's hash tag, so
    a queue script reads the stock and changes the queue in one slot, atomically."""

    base: str

    @property
    def line(self) -> str:
        """Sorted set: waiting user -> place (the order of admission)."""
        return f"{self.base}:line"

    @property
    def seen(self) -> str:
        """Sorted set: waiting user -> when a gateway last saw them poll (ms, Redis time)."""
        return f"{self.base}:seen"

    @property
    def members(self) -> str:
        """Hash: user -> "place:joined_ms" of their latest join."""
        return f"{self.base}:members"

    @property
    def passes(self) -> str:
        """Sorted set: user holding an unused pass -> its expiry (ms)."""
        return f"{self.base}:passes"

    @property
    def used(self) -> str:
        """Sorted set: user whose pass bought -> its expiry (still good for retries)."""
        return f"{self.base}:used"

    @property
    def closed(self) -> str:
        """Set: users told closed (too far back for the stock left, or sold out)."""
        return f"{self.base}:closed"

    @property
    def meta(self) -> str:
        """Hash: the join counter, the shuffle's seed and instant, and the totals."""
        return f"{self.base}:meta"

    @property
    def bucket(self) -> str:
        """Hash: the admission token bucket (admit_rate, by Redis's clock)."""
        return f"{self.base}:bucket"

    @property
    def view(self) -> str:
        """String: the last view computed, shared by every gateway for a moment."""
        return f"{self.base}:view"

    @property
    def blocks(self) -> str:
        """Hash: waiters in line per block of places (see _prelude.lua's queue_count)."""
        return f"{self.base}:blocks"

    @property
    def admitted(self) -> str:
        """List: the latest passes issued, "user expiry_ms" (newest first, capped)."""
        return f"{self.base}:admitted"

    @property
    def withdrawn(self) -> str:
        """List: the latest users whose pass was withdrawn (newest first, capped)."""
        return f"{self.base}:withdrawn"

    @property
    def solved(self) -> str:
        """Sorted set: salts of proof-of-work challenges used -> their expiry (ms)."""
        return f"{self.base}:solved"

    def all(self) -> list[str]:
        return [
            self.line,
            self.seen,
            self.members,
            self.passes,
            self.used,
            self.closed,
            self.meta,
            self.bucket,
            self.view,
            self.blocks,
            self.admitted,
            self.withdrawn,
            self.solved,
        ]


def cart_keys(cart_id: str, prefix: str = "fg") -> CampaignKeys:
    """A cart's keys: a campaign's layout under the cart's own tag ``{<cart id>}`` (cart
    and campaign ids never clash), without counters. Its ``state`` hash keeps only the
    orders' counts by state and the sweepers' ``due_at``; ``reservation`` names an
    order's record; ``orders``, ``dead_letters`` and ``delivery_slots`` serve its
    deliveries as a campaign's do."""
    return CampaignKeys(cart_id, prefix)


def processes_key(prefix: str = "fg") -> str:
    """Sorted set of live gateway processes (not campaign data: any slot will do)."""
    return f"{prefix}:gateways"


class _Entropy:
    """Bytes from the OS's CSPRNG, fetched 4 KiB at a time: one system call per few
    hundred reservation ids instead of one each. A forked child starts afresh, so two
    processes never hand out the same bytes."""

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0
        os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        self._bytes, self._at = b"", 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._bytes):
            self._bytes, self._at = os.urandom(4096), 0
        self._at += size
        return self._bytes[self._at - size : self._at]


_entropy = _Entropy()


def new_reservation_id(campaign_id: str) -> str:
    """A fresh, unguessable reservation id that names its campaign."""
    return f"{campaign_id}.{_entropy.take(10).hex()}"


def campaign_of(reservation_id: str) -> str | None:
    """The campaign id inside a reservation id, or None when it is not one of ours."""
    match = RESERVATION_ID.match(reservation_id)
    return match.group(1) if match else None


def idempotency_field(user_id: str, key: str) -> str:
    """Hash field scoping an Idempotency-Key to one user (length-prefixed, unambiguous)."""
    return f"{len(user_id)}:{user_id}{key}"
