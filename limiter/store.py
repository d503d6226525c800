"""Typed async wrappers around one campaign's scripts: keys first, then arguments."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from limiter.errors import CampaignMissing
from limiter.keys import CampaignKeys
from limiter.pipeline import AutoPipeline
from limiter.records import (
    Adjustment,
    AdjustStatus,
    Attempt,
    CommitItem,
    CommitStatus,
    DeadLetter,
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


class CampaignStore:
    """All Redis operations of one campaign."""

    def __init__(
        self,
        pipe: AutoPipeline,
        scripts: Scripts,
        keys: CampaignKeys,
        policy: StorePolicy,
    ) -> None:
        self.pipe = pipe
        self.scripts = scripts
        self.keys = keys
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

    @property
    def campaign_id(self) -> str:
        return self.keys.campaign_id

    async def init(self, stock: int, actor: str = "config") -> tuple[bool, Figures]:
        """Create the counters with ``stock`` unless they exist; returns (created, figures)."""
        reply = await self.pipe.script(
            self.scripts.init_campaign,
            [self.keys.state, self.keys.ledger],
            [stock, actor, self.policy.ledger_max_length],
            "init_campaign",
        )
        return bool(reply[0]), Figures(*map(int, reply[1:]))

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

    async def keep_reply(self, reservation_id: str, reply: Reply) -> None:
        await self.pipe.call(
            "HSET",
            self.keys.reservation(reservation_id),
            "reply_status",
            reply.status,
            "reply_type",
            reply.content_type,
            "reply_body",
            reply.body,
            "reply_headers",
            reply.headers,
            what="keep the reply",
        )

    async def count_attempt(self, reservation_id: str) -> int:
        reply = await self.pipe.call(
            "HINCRBY", self.keys.reservation(reservation_id), "attempts", 1, what="count attempt"
        )
        return int(reply)

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
                item.leavable.value,
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
        reply_ = await self.pipe.guard.wait(self.submit_commits([item], actor), "commit")
        (result,) = self.commits([item], reply_)
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

    async def earliest_deadline(self) -> int | None:
        """When the campaign's next deadline falls due (Redis time, ms), if any."""
        reply = await self.pipe.call(
            "ZRANGE", self.keys.deadlines, 0, 0, "WITHSCORES", what="read the next deadline"
        )
        return int(float(reply[1])) if reply else None

    async def due(self, limit: int = 100) -> list[str]:
        """Ids of reservations whose deadline has passed (by Redis's clock)."""
        reply = await self.pipe.script(self.scripts.due, [self.keys.deadlines], [limit], "due")
        return [item.decode() for item in reply]

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

    async def delivery_slot(self, how: str, holder: str, max_inflight: int, ttl_ms: int) -> int:
        """Take, give back or linger one of the backend's delivery slots (see
        delivery_slot.lua): 1 done, 0 every slot busy, -1 this holder has one already."""
        reply = await self.pipe.script(
            self.scripts.delivery_slot,
            [self.keys.delivery_slots],
            [how, holder, max_inflight, ttl_ms],
            f"{how} a delivery slot",
        )
        return int(reply)

    async def keep_order(self, group: str, consumer: str, message_id: bytes) -> None:
        """Reset a queued order's idle time: its consumer is still working on it."""
        await self.pipe.call(
            "XCLAIM", self.keys.orders, group, consumer, 0, message_id, what="keep an order"
        )

    async def drop_order(self, group: str, message_id: bytes) -> None:
        """Done with an order: out of the group's pending list and out of the stream, so
        the stream's length is the queue's depth."""
        orders = self.keys.orders
        await asyncio.gather(
            self.pipe.call("XACK", orders, group, message_id, what="ack an order"),
            self.pipe.call("XDEL", orders, message_id, what="drop an order"),
        )

    async def bound_reservation(self, idempotency_field: str) -> str | None:
        """The reservation an Idempotency-Key names while it is held or committed (a
        release unbinds it), or None."""
        reply = await self.pipe.call(
            "HGET", self.keys.idempotency, idempotency_field, what="read idempotency key"
        )
        return reply.decode() if reply else None

    async def dead_letters(self, count: int = 100, after: str = "") -> list[DeadLetter]:
        """Dead letters, oldest first: up to ``count`` after the entry id ``after``."""
        start = f"({after}" if after else "-"
        reply = await self.pipe.call(
            "XRANGE", self.keys.dead_letters, start, "+", "COUNT", count, what="read dead letters"
        )
        return [_dead_letter(entry_id, fields) for entry_id, fields in reply or []]

    async def replay_dead_letter(self, entry_id: str, actor: str) -> Replay:
        """Take a dead letter's stock again and queue its order (replay_dead_letter.lua)."""
        k = self.keys
        entries = await self.pipe.call(
            "XRANGE", k.dead_letters, entry_id, entry_id, what="read a dead letter"
        )
        if not entries:
            return Replay(ReplayStatus.NO_LETTER, "no such dead letter")
        rid = _dead_letter(*entries[0]).reservation_id
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


def _dead_letter(entry_id: Any, raw: Any) -> DeadLetter:
    fields = (
        {k: v for k, v in zip(raw[::2], raw[1::2], strict=True)} if isinstance(raw, list) else raw
    )
    return DeadLetter(
        entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
        fields.get(b"rid", b"").decode(),
        fields.get(b"reason", b"").decode(errors="replace"),
        int(fields.get(b"attempts", b"0") or 0),
        fields.get(b"payload", b""),
    )


def parse_reservation(reservation_id: str, campaign_id: str, raw: Mapping[Any, Any]) -> Reservation:
    def text(field: str) -> str:
        value: bytes = raw.get(field.encode(), b"")
        return value.decode()

    def number(field: str) -> int:
        return int(raw.get(field.encode(), b"0") or 0)

    reply = None
    if raw.get(b"reply_status"):
        reply = Reply(
            number("reply_status"),
            text("reply_type"),
            raw.get(b"reply_body", b""),
            text("reply_headers"),
        )
    return Reservation(
        id=reservation_id,
        campaign_id=campaign_id,
        user_id=text("user"),
        quantity=number("qty"),
        state=State(text("state")),
        mode=text("mode"),
        created_ms=number("created_ms"),
        updated_ms=number("updated_ms"),
        deadline_ms=number("deadline_ms"),
        reason=text("reason"),
        attempts=number("attempts"),
        conflict=bool(number("conflict")),
        reply=reply,
        fingerprint=text("fp"),
    )
