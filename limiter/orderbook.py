"""What campaigns and carts have alike in Redis: records under one hash tag, a
deadlines sorted set, an orders stream that dispatchers deliver from (with its
delivery slots and dead letters), and Idempotency-Key bindings. CampaignStore and
CartStore build on it; the dispatcher and the sweeper need no more than this."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from limiter.keys import CampaignKeys
from limiter.pipeline import AutoPipeline
from limiter.records import DeadLetter, Reply
from limiter.scripts import Scripts


class OrderBook:
    """The Redis operations on one key set's orders (a campaign shard's, or a cart's)."""

    def __init__(self, pipe: AutoPipeline, scripts: Scripts, keys: CampaignKeys) -> None:
        self.pipe = pipe
        self.scripts = scripts
        self.keys = keys

    @property
    def campaign_id(self) -> str:
        """The campaign's id (a cart's: the cart's id)."""
        return self.keys.campaign_id

    @property
    def name(self) -> str:
        """Names this key set among all of them (a shard of a campaign has its own)."""
        return self.keys.base

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

    async def earliest_deadline(self) -> int | None:
        """When the next deadline here falls due (Redis time, ms), if any."""
        reply = await self.pipe.call(
            "ZRANGE", self.keys.deadlines, 0, 0, "WITHSCORES", what="read the next deadline"
        )
        return int(float(reply[1])) if reply else None

    async def due(self, limit: int = 100) -> list[str]:
        """Ids of reservations whose deadline has passed (by Redis's clock)."""
        reply = await self.pipe.script(self.scripts.due, [self.keys.deadlines], [limit], "due")
        return [item.decode() for item in reply]

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
        return [dead_letter_of(entry_id, fields) for entry_id, fields in reply or []]


def dead_letter_of(entry_id: Any, raw: Any) -> DeadLetter:
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


class RecordFields:
    """A record's hash as HGETALL returns it, read field by field."""

    def __init__(self, raw: Mapping[Any, Any]) -> None:
        self.raw = raw

    def text(self, field: str) -> str:
        value: bytes = self.raw.get(field.encode(), b"")
        return value.decode()

    def number(self, field: str) -> int:
        return int(self.raw.get(field.encode(), b"0") or 0)

    def reply(self) -> Reply | None:
        """The backend's answer kept on the record, if any."""
        if not self.raw.get(b"reply_status"):
            return None
        return Reply(
            self.number("reply_status"),
            self.text("reply_type"),
            self.raw.get(b"reply_body", b""),
            self.text("reply_headers"),
        )
