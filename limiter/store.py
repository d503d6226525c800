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
    CommitStatus,
    Decision,
    Figures,
    ReleaseStatus,
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
            args += (a.reservation_id, a.user_id, a.quantity, a.idempotency_field, a.payload)
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
        k = self.keys
        args: list[str | int | bytes] = [
            reservation_id,
            ",".join(leavable),
            target.value,
            reason,
            actor,
            self.policy.ledger_max_length,
            k.events,
            "due" if only_when_due else "",
            dead_letter,
            "tombstone" if tombstone else "",
        ]
        keys = [
            k.state,
            k.users,
            k.idempotency,
            k.ledger,
            k.deadlines,
            k.reservation(reservation_id),
            k.orders,
            k.dead_letters,
        ]
        reply = await self.pipe.script(self.scripts.release, keys, args, "release")
        return Transition(ReleaseStatus(int(reply[0])), reply[1].decode())

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
        k = self.keys
        status, content_type, body, headers = (
            (str(reply.status), reply.content_type, reply.body, reply.headers)
            if reply
            else ("", "", b"", "")
        )
        args = [
            reservation_id,
            target.value,
            hold_ms,
            "retake" if retake else "",
            self.policy.per_user_limit,
            status,
            content_type,
            body,
            actor,
            self.policy.ledger_max_length,
            k.events,
            leavable.value,
            headers,
        ]
        keys = [
            k.state,
            k.users,
            k.ledger,
            k.deadlines,
            k.reservation(reservation_id),
            k.idempotency,
        ]
        result = await self.pipe.script(self.scripts.commit, keys, args, "commit")
        return Transition(CommitStatus(int(result[0])), result[1].decode())

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

    async def reservation(self, reservation_id: str) -> Reservation | None:
        raw = await self.pipe.call(
            "HGETALL", self.keys.reservation(reservation_id), what="read reservation"
        )
        return parse_reservation(reservation_id, self.campaign_id, raw) if raw else None


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
    )
