"""A malformed answer from the order backend, seen from the buyer and from Redis.

The backend failed: the reservation is released before the buyer hears, the buyer
gets a well-formed 502 upstream-failed (never a dropped connection), nothing of the
answer is kept, and a retry with the same Idempotency-Key is a fresh attempt (a
released reservation frees its key) rather than a replay of anything broken.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.helpers import Gateway, check_invariant, problem_of
from tests.test_http1 import MALFORMED_ANSWERS, read_request, tcp_server

pytestmark = pytest.mark.integration

CAMPAIGN = "phone-1111"
STOCK = 10  # the stock of the test campaign (tests/conftest.py)
REPLY_FIELDS = ("reply_status", "reply_type", "reply_body", "reply_headers")
#: The cases that reach the buyer through the gateway: the client's table, but the
#: copies that differ only in bytes llhttp reports the same way.
BUYER_CASES = [
    "bare-lf-in-a-value",
    "bare-cr-in-a-value",
    "bare-lf-line-endings",
    "nul-in-a-value",
    "space-in-a-name",
    "control-char-in-a-name",
    "obs-fold",
    "four-digit-status",
    "http/2-status-line",
    "misspelt-protocol",
    "http/2.0",
    "status-above-599",
    "conflicting-lengths",
    "negative-length",
    "hex-length",
    "length-then-chunked",
    "chunked-twice",
    "non-hex-chunk-size",
    "chunk-longer-than-announced",
    "bare-lf-in-a-trailer",
    "oversized-head",
    "endless-head",
    "switching-protocols",
]


def accepted_answer() -> bytes:
    body = json.dumps({"order_id": "o-1"}).encode()
    return (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@dataclass
class RawShop:
    """A backend writing exact bytes: ``first`` to the first request, a well-formed
    201 to every later one; it counts the requests it read."""

    first: bytes = b""
    requests: int = 0
    url: str = ""
    later: bytes = field(default_factory=accepted_answer)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            self.requests += 1
            writer.write(self.first if self.requests == 1 else self.later)
            await writer.drain()


@pytest.fixture
async def raw_shop() -> AsyncIterator[RawShop]:
    shop = RawShop()
    async with tcp_server(shop.handle) as url:
        shop.url = url
        yield shop


@pytest.fixture
def settings_data(settings_data: dict[str, Any], raw_shop: RawShop) -> dict[str, Any]:
    """The test settings, with the campaign's backend the raw shop."""
    settings_data["upstreams"]["shop"]["url"] = raw_shop.url
    return settings_data


async def kept_reply(redis: Redis, rid: str) -> list[Any]:
    """The reply fields of the reservation's record in Redis (None: not kept)."""
    record = f"fg:{{{CAMPAIGN}}}:r:{rid.rpartition('.')[2]}"
    return list(await redis.hmget(record, *REPLY_FIELDS))


async def record_state(redis: Redis, rid: str) -> Any:
    """The state field of the reservation's record in Redis."""
    return await redis.hget(f"fg:{{{CAMPAIGN}}}:r:{rid.rpartition('.')[2]}", "state")


@pytest.mark.parametrize("case", BUYER_CASES)
async def test_a_malformed_backend_answer_is_a_502_and_gives_the_stock_back(
    raw_shop: RawShop, gateway: Gateway, redis: Redis, case: str
) -> None:
    raw_shop.first = MALFORMED_ANSWERS[case][0]

    response = await gateway.buy("alice", key="order-1")  # a dropped connection raises here
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (502, "upstream-failed"), problem
    assert "the reservation is released" in problem["detail"]
    rid = problem["reservation_id"]
    assert response.headers["X-Reservation-Id"] == rid

    # released before the buyer heard, and nothing of the answer kept
    assert await record_state(redis, rid) == b"released"
    assert await kept_reply(redis, rid) == [None] * len(REPLY_FIELDS)
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (STOCK, 0, 0)

    # the key was freed with the reservation: the retry is a new attempt, not a replay
    retry = await gateway.buy("alice", key="order-1")
    assert retry.status == 201
    assert await retry.json() == {"order_id": "o-1"}
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.headers["X-Reservation-Id"] != rid
    assert raw_shop.requests == 2
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (STOCK - 1, 0, 1)
    assert await record_state(redis, rid) == b"released"  # the first stays as it was
