"""Redis key layout of a campaign.

Every key of one campaign carries the same hash tag, ``{<campaign id>}``, so that
all of them live in one Redis Cluster slot and every script touches one slot.
Key names are built here and nowhere else; scripts receive them through KEYS.

A campaign with ``shards: K`` (K > 1) spreads its stock over K shards, each with the
keys of a whole campaign under a tag of its own: shard 0 keeps ``{<campaign id>}``,
shard j the tag ``{<campaign id>~<n>}`` whose slot falls in the j-th K-th of the
16384 slots (``shard_tags``), so that the shards land on different cluster nodes.
Keys that belong to the campaign as a whole (its token buckets, delivery slots,
waiting room, rebalancing lease) stay under shard 0's tag. A reservation id names
its shard in the first two hex digits of its token.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from gateway.config.values import CAMPAIGN_ID

#: Reservation ids are ``<campaign id>.<token>``.
RESERVATION_ID = re.compile(rf"^({CAMPAIGN_ID.pattern.strip('^$')})\.([0-9a-f]{{20}})$")


@dataclass(frozen=True, slots=True)
class CampaignKeys:
    """Names of one campaign's keys (and its pub/sub channel); of one of its shards
    when it has several (``shard``, under ``tag``)."""

    campaign_id: str
    prefix: str = "fg"
    shard: int = 0
    #: The hash tag of this shard's keys (None: the campaign id, shard 0's).
    tag: str | None = None

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.tag or self.campaign_id}}}"

    @property
    def campaign_base(self) -> str:
        """Where the keys of the campaign as a whole live: shard 0's tag."""
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
        """Sorted set: deliveries in flight to the backend (holder -> expiry, ms); one
        for the whole campaign."""
        return f"{self.campaign_base}:inflight"

    @property
    def bucket(self) -> str:
        """Hash: the campaign's distributed token bucket (one for the whole campaign)."""
        return f"{self.campaign_base}:bucket"

    @property
    def client_buckets(self) -> str:
        """Key prefix of per-client buckets (one small hash per client)."""
        return f"{self.campaign_base}:cb:"

    @property
    def admission(self) -> str:
        """Hash: admission-ratio budget (requests let through to the deduction stage),
        of this shard: each shard admits in proportion to its own stock."""
        return f"{self.base}:admit"

    @property
    def transfers(self) -> str:
        """Sorted set: stock sent from this shard to another and not yet known to have
        arrived (transfer id -> deadline, ms); each has a record (``transfer``)."""
        return f"{self.base}:transfers"

    def transfer(self, transfer_id: str) -> str:
        """Hash: one transfer of stock (to, units, state)."""
        return f"{self.base}:t:{transfer_id}"

    @property
    def received(self) -> str:
        """Hash: transfer id -> units, of the transfers this shard has taken in (a
        transfer arrives once however often it is sent)."""
        return f"{self.base}:received"

    @property
    def rebalancer(self) -> str:
        """String: the gateway process that moves stock between the shards now (a
        lease, so that one at a time does)."""
        return f"{self.campaign_base}:rebalancer"

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


def new_reservation_id(campaign_id: str, shard: int | None = None) -> str:
    """A fresh, unguessable reservation id that names its campaign (and, for a
    sharded campaign, its shard: the token's first byte)."""
    if shard is None:
        return f"{campaign_id}.{_entropy.take(10).hex()}"
    return f"{campaign_id}.{shard:02x}{_entropy.take(9).hex()}"


def shard_of(reservation_id: str) -> int:
    """The shard a sharded campaign's reservation id names (its token's first byte)."""
    token = reservation_id.rpartition(".")[2]
    return int(token[:2], 16) if len(token) == 20 else 0


@cache
def shard_tags(campaign_id: str, shards: int) -> tuple[str, ...]:
    """The hash tags of a campaign's shards: the campaign id for shard 0 (so that one
    shard is today's layout), and for the others a suffix searched so that their slots
    fall in distinct K-ths of the slot space, the ones shard 0's slot does not (a
    cluster gives each node a range of slots: the shards land on different nodes)."""
    if shards == 1:
        return (campaign_id,)
    width = REDIS_CLUSTER_HASH_SLOTS / shards
    taken = {int(key_slot(campaign_id.encode()) // width)}
    tags = [campaign_id]
    suffix = 0
    while len(tags) < shards:
        candidate = f"{campaign_id}~{suffix}"
        part = int(key_slot(candidate.encode()) // width)
        if part not in taken:
            taken.add(part)
            tags.append(candidate)
        suffix += 1
    return tuple(tags)


def shard_keys(campaign_id: str, prefix: str, shards: int) -> tuple[CampaignKeys, ...]:
    """The keys of every shard of a campaign (one: exactly the unsharded layout)."""
    tags = shard_tags(campaign_id, shards)
    return tuple(
        CampaignKeys(campaign_id, prefix, j, None if j == 0 else tag) for j, tag in enumerate(tags)
    )


def home_shard(user_id: str, shards: int) -> int:
    """The shard that keeps a user's quota and Idempotency-Keys (and decides their
    purchases): stable across processes and restarts."""
    if shards == 1:
        return 0
    return zlib.crc32(user_id.encode()) % shards


def campaign_of(reservation_id: str) -> str | None:
    """The campaign id inside a reservation id, or None when it is not one of ours."""
    match = RESERVATION_ID.match(reservation_id)
    return match.group(1) if match else None


def idempotency_field(user_id: str, key: str) -> str:
    """Hash field scoping an Idempotency-Key to one user (length-prefixed, unambiguous)."""
    return f"{len(user_id)}:{user_id}{key}"
