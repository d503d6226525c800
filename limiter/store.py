"""Typed async wrappers around one campaign's scripts: keys first, then arguments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from limiter.errors import CampaignMissing
from limiter.keys import CampaignKeys
from limiter.orderbook import OrderBook, RecordFields, dead_letter_of
from limiter.pipeline import AutoPipeline
from limiter.records import (
    Adjustment,
    AdjustStatus,
    Attempt,
    CommitItem,
    CommitStatus,
    Decision,
    Figures,
    ReleaseItem,
    ReleaseStatus,
    Replay,
    ReplayStatus,
    Reply,
    Reservation,
    ReserveStatus,
    State,
    Transition,
)
from limiter.scripts import Scripts


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """The campaign settings the scripts need."""

    per_user_limit: int
    #: ms after reserving before a reservation still unsettled (sync) or not handed over
    #: (queue) is delivered from its kept order, or given back if it has none (0: never)
    reserve_deadline_ms: int
    ledger_max_length: int
    mode: str = "sync"


class CampaignStore(OrderBook):
    """All Redis operations of one campaign (of one shard of it)."""

    def __init__(
        self,
        pipe: AutoPipeline,
        scripts: Scripts,
        keys: CampaignKeys,
        policy: StorePolicy,
    ) -> None:
        super().__init__(pipe, scripts, keys)
        self.policy = policy
        k = keys
        self._reserve_keys: list[str] = [
            k.state,
            k.users,
            k.idempotency,
            k.ledger,
            k.index,
            k.deadlines,
        ]
        self._reserve_args: list[str | int] = [
            policy.per_user_limit,
            policy.reserve_deadline_ms,
            policy.ledger_max_length,
            policy.mode,
            k.events,
        ]

    def for_carts(self) -> CampaignStore:
        """This shard deciding the items of carts: reserve.lua's mode "cart", without a
        deadline of their own (their cart's order keeps it, and decides their fate)."""
        policy = replace(self.policy, mode="cart", reserve_deadline_ms=0)
        return CampaignStore(self.pipe, self.scripts, self.keys, policy)

    async def init(self, stock: int, actor: str = "config") -> tuple[bool, Figures]:
        """Create the counters with ``stock`` unless they exist; returns (created, figures)."""
        created, figures, _ = await self.create(stock, actor)
        return created, figures

    async def create(self, stock: int, actor: str, shards: int = 1) -> tuple[bool, Figures, int]:
        """Create the counters of this shard unless they exist: (created, figures, the
        shards the campaign was created with)."""
        reply = await self.pipe.script(
            self.scripts.init_campaign,
            [self.keys.state, self.keys.ledger],
            [stock, actor, self.policy.ledger_max_length, shards],
            "init_campaign",
        )
        return bool(reply[0]), Figures(*map(int, reply[1:5])), int(reply[5])

    async def shape(self) -> int | None:
        """The shards the campaign was created with, read from this (its first) shard;
        None when the shard has no counters."""
        available, shards = await self.pipe.call(
            "HMGET", self.keys.state, "available", "shards", what="read counters"
        )
        return None if available is None else int(shards or 1)

    # --- moving stock between the shards of a campaign (shards: K)

    async def transfer_out(self, transfer_id: str, to: int, want: int, actor: str) -> int:
        """Send up to ``want`` units to shard ``to``; the units sent (0: none here)."""
        k = self.keys
        reply = await self.pipe.script(
            self.scripts.transfer_out,
            [k.state, k.ledger, k.transfers, k.transfer(transfer_id)],
            [
                transfer_id,
                to,
                want,
                self.policy.reserve_deadline_ms or 30_000,
                actor,
                self.policy.ledger_max_length,
                k.events,
            ],
            "send stock to a shard",
        )
        return int(reply[0])

    async def transfer_in(self, transfer_id: str, source: int, units: int, actor: str) -> int:
        """Take in a transfer from shard ``source`` (once); see transfer_in.lua."""
        k = self.keys
        reply = await self.pipe.script(
            self.scripts.transfer_in,
            [k.state, k.ledger, k.received],
            [transfer_id, source, units, actor, self.policy.ledger_max_length, k.events],
            "take in stock from a shard",
        )
        return int(reply)

    async def transfer_done(self, transfer_id: str) -> None:
        k = self.keys
        await self.pipe.script(
            self.scripts.transfer_done,
            [k.state, k.transfers, k.transfer(transfer_id)],
            [transfer_id],
            "finish a transfer",
        )

    async def due_transfers(self, limit: int = 100) -> list[tuple[str, int, int]]:
        """Transfers sent from here whose deadline passed: (id, receiving shard, units)."""
        ids = await self.pipe.call(
            "ZRANGEBYSCORE",
            self.keys.transfers,
            "-inf",
            int(time.time() * 1000),
            "LIMIT",
            0,
            limit,
            what="read due transfers",
        )
        found = []
        for raw in ids:
            transfer_id = raw.decode()
            to, units = await self.pipe.call(
                "HMGET", self.keys.transfer(transfer_id), "to", "units", what="read a transfer"
            )
            if to is not None and units is not None:
                found.append((transfer_id, int(to), int(units)))
        return found

    async def balance(self) -> tuple[int, int]:
        """(available, units sent to other shards and not known to have arrived)."""
        available, out = await self.pipe.call(
            "HMGET", self.keys.state, "available", "out_units", what="read counters"
        )
        if available is None:
            raise CampaignMissing(self.campaign_id)
        return int(available), int(out or 0)

    def submit_reserve(self, attempts: Sequence[Attempt]) -> asyncio.Future[Any]:
        """Queue one reserve.lua call deciding ``attempts``; see ``decisions()``."""
        keys = list(self._reserve_keys)
        args: list[str | int | bytes] = list(self._reserve_args)
        for a in attempts:
            keys.append(self.keys.reservation(a.reservation_id))
            args += (
                a.reservation_id,
                a.user_id,
                a.quantity,
                a.idempotency_field,
                a.payload,
                a.fingerprint,
            )
        return self.pipe.submit_script(self.scripts.reserve, keys, args)

    @staticmethod
    def decisions(attempts: Sequence[Attempt], reply: Sequence[Any]) -> list[Decision]:
        return [
            Decision(ReserveStatus(int(reply[i])), reply[i + 1].decode(), int(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    async def reserve(self, attempts: Sequence[Attempt]) -> list[Decision]:
        """Decide a batch of attempts in one script call."""
        reply = await self.pipe.guard.wait(self.submit_reserve(attempts), "reserve")
        return self.decisions(attempts, reply)

    def submit_releases(self, items: Sequence[ReleaseItem], actor: str) -> asyncio.Future[Any]:
        """Queue one release.lua call for ``items`` (see ``transitions()``)."""
        k = self.keys
        keys = [k.state, k.users, k.idempotency, k.ledger, k.deadlines, k.orders, k.dead_letters]
        args: list[str | int | bytes] = [actor, self.policy.ledger_max_length, k.events]
        for item in items:
            keys.append(k.reservation(item.reservation_id))
            args += (
                item.reservation_id,
                ",".join(item.leavable),
                item.target.value,
                item.reason,
                "due" if item.only_when_due else "",
                item.dead_letter,
                "tombstone" if item.tombstone else "",
            )
        return self.pipe.submit_script(self.scripts.release, keys, args)

    @staticmethod
    def releases(items: Sequence[ReleaseItem], reply: Sequence[Any]) -> list[Transition]:
        return [
            Transition(ReleaseStatus(int(reply[i])), reply[i + 1].decode())
            for i in range(0, len(reply), 2)
        ]

    async def release(
        self,
        reservation_id: str,
        *,
        leavable: Sequence[State],
        target: State,
        reason: str,
        actor: str,
        only_when_due: bool = False,
        dead_letter: bytes = b"",
        tombstone: bool = False,
    ) -> Transition:
        """Give a reservation back to stock, once; see release.lua for the statuses.

        ``dead_letter``: the order payload to keep in the dead letters stream.
        ``tombstone``: when undoing a reserve call whose fate is unknown, make sure it
        cannot take effect later (and leave one handed over for delivery to it).
        """
        item = ReleaseItem(
            reservation_id, tuple(leavable), target, reason, only_when_due, dead_letter, tombstone
        )
        (result,) = await self.release_all([item], actor)
        return result

    async def release_all(self, items: Sequence[ReleaseItem], actor: str) -> list[Transition]:
        """Release several reservations in one script call."""
        reply = await self.pipe.guard.wait(self.submit_releases(items, actor), "release")
        return self.releases(items, reply)

    def submit_commits(self, items: Sequence[CommitItem], actor: str) -> asyncio.Future[Any]:
        """Queue one commit.lua call for ``items`` (see ``commits()``)."""
        k = self.keys
        keys = [k.state, k.users, k.ledger, k.deadlines, k.idempotency]
        args: list[str | int | bytes] = [
            self.policy.per_user_limit,
            actor,
            self.policy.ledger_max_length,
            k.events,
        ]
        for item in items:
            keys.append(k.reservation(item.reservation_id))
            reply = item.reply
            args += (
                item.reservation_id,
                item.target.value,
                item.hold_ms,
                "retake" if item.retake else "",
                item.leavable if isinstance(item.leavable, str) else ",".join(item.leavable),
                str(reply.status) if reply else "",
                reply.content_type if reply else "",
                reply.body if reply else b"",
                reply.headers if reply else "",
            )
        return self.pipe.submit_script(self.scripts.commit, keys, args)

    @staticmethod
    def commits(items: Sequence[CommitItem], reply: Sequence[Any]) -> list[Transition]:
        return [
            Transition(CommitStatus(int(reply[i])), reply[i + 1].decode())
            for i in range(0, len(reply), 2)
        ]

    async def commit_all(self, items: Sequence[CommitItem], actor: str) -> list[Transition]:
        """Settle several reservations in one script call."""
        reply = await self.pipe.guard.wait(self.submit_commits(items, actor), "commit")
        return self.commits(items, reply)

    async def commit(
        self,
        reservation_id: str,
        *,
        target: State,
        hold_ms: int = 0,
        retake: bool = False,
        reply: Reply | None = None,
        actor: str = "gateway",
        leavable: State = State.RESERVED,
    ) -> Transition:
        """Settle a reservation (commit, hold or confirm); see commit.lua for the statuses."""
        item = CommitItem(reservation_id, target, hold_ms, retake, leavable, reply)
        (result,) = await self.commit_all([item], actor)
        return result

    async def adjust(
        self, *, delta: int | None = None, set_to: int | None = None, actor: str
    ) -> Adjustment:
        """Change stock by ``delta`` or set available to ``set_to``, atomically against buying."""
        how, n = ("delta", delta) if set_to is None else ("set", set_to)
        if n is None:
            raise ValueError("adjust needs delta or set_to")
        args: list[str | int] = [how, n, actor, self.policy.ledger_max_length, self.keys.events]
        reply = await self.pipe.script(
            self.scripts.adjust_stock, [self.keys.state, self.keys.ledger], args, "adjust_stock"
        )
        return Adjustment(AdjustStatus(int(reply[0])), Figures(*map(int, reply[1:])))

    async def figures(self) -> Figures:
        reply = await self.pipe.call(
            "HMGET",
            self.keys.state,
            "available",
            "reserved",
            "sold",
            "stock_total",
            what="read counters",
        )
        if reply[0] is None:
            raise CampaignMissing(self.campaign_id)
        return Figures(*(int(v or 0) for v in reply))

    async def decided(self) -> int:
        """Requests that ever reached the deduction stage (reserve.lua counts them)."""
        reply = await self.pipe.call("HGET", self.keys.state, "decided", what="read counters")
        return int(reply or 0)

    async def hand_over(self, reservation_id: str) -> bool:
        """Queue mode: the buyer is being told 202; the order goes to the orders stream
        (see hand_over.lua). False when it is no longer reserved, or was handed over."""
        k = self.keys
        reply = await self.pipe.script(
            self.scripts.hand_over,
            [k.reservation(reservation_id), k.deadlines, k.orders],
            [reservation_id],
            "hand over an order",
        )
        return int(reply) == 1

    async def replay_dead_letter(self, entry_id: str, actor: str) -> Replay:
        """Take a dead letter's stock again and queue its order (replay_dead_letter.lua)."""
        k = self.keys
        entries = await self.pipe.call(
            "XRANGE", k.dead_letters, entry_id, entry_id, what="read a dead letter"
        )
        if not entries:
            return Replay(ReplayStatus.NO_LETTER, "no such dead letter")
        rid = dead_letter_of(*entries[0]).reservation_id
        keys = [
            k.state,
            k.users,
            k.idempotency,
            k.ledger,
            k.dead_letters,
            k.orders,
            k.reservation(rid),
        ]
        args: list[str | int] = [
            entry_id,
            rid,
            self.policy.per_user_limit,
            actor,
            self.policy.ledger_max_length,
            k.events,
        ]
        reply = await self.pipe.script(
            self.scripts.replay_dead_letter, keys, args, "replay a dead letter"
        )
        return Replay(ReplayStatus(int(reply[0])), reply[1].decode())

    async def reservation(self, reservation_id: str) -> Reservation | None:
        raw = await self.pipe.call(
            "HGETALL", self.keys.reservation(reservation_id), what="read reservation"
        )
        return parse_reservation(reservation_id, self.campaign_id, raw) if raw else None


def parse_reservation(reservation_id: str, campaign_id: str, raw: Mapping[Any, Any]) -> Reservation:
    f = RecordFields(raw)
    return Reservation(
        id=reservation_id,
        campaign_id=campaign_id,
        user_id=f.text("user"),
        quantity=f.number("qty"),
        state=State(f.text("state")),
        mode=f.text("mode"),
        created_ms=f.number("created_ms"),
        updated_ms=f.number("updated_ms"),
        deadline_ms=f.number("deadline_ms"),
        reason=f.text("reason"),
        attempts=f.number("attempts"),
        conflict=bool(f.number("conflict")),
        reply=f.reply(),
        fingerprint=f.text("fp"),
        cart_order=f.text("cart"),
    )
