"""Idempotency-Key as draft-ietf-httpapi-idempotency-key-header says: a structured-field
string (quoted and bare are one key), 422 for a key reused with another request, 409
duplicate with Retry-After while the first is in flight, a campaign that requires a key;
and Retry-After spread by the jitter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from gateway.edge.buyer import fingerprint, parse_key
from gateway.problems import retry_after
from tests.helpers import (
    Gateway,
    OpenGateway,
    Shop,
    accept,
    check_invariant,
    problem_of,
    redis_snapshot,
)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        (r'"a\"b\\c"', 'a"b\\c'),
        ('a"b', 'a"b'),  # bare text, as flashgate always took it
        ('"abc', None),
        ('"abc"x', None),
        ('""', None),
        ('"' + "k" * 129 + '"', None),
        ('"tab\there"', None),
    ],
)
def test_a_key_is_a_structured_field_string_or_bare_text(value: str, key: str | None) -> None:
    assert parse_key(value) == key


def test_the_fingerprint_covers_route_quantity_and_body() -> None:
    one = fingerprint("POST /a", 1, b'{"quantity":1}')
    assert one == fingerprint("POST /a", 1, b'{"quantity":1}')
    assert (
        len({one, fingerprint("POST /b", 1, b'{"quantity":1}'), fingerprint("POST /a", 2, b"")})
        == 3
    )
    assert one != fingerprint("POST /a", 1, b'{"quantity": 1}')


async def test_quoted_and_bare_are_the_same_key(gateway: Gateway, shop: Shop) -> None:
    first = await gateway.buy("alice", key="k-1")
    assert first.status == 201
    retry = await gateway.buy("alice", key='"k-1"')
    assert (retry.status, retry.headers["Idempotent-Replayed"]) == (201, "true")
    assert retry.headers["X-Reservation-Id"] == first.headers["X-Reservation-Id"]
    assert len(shop.seen) == 1


async def test_a_malformed_key_is_400_and_changes_nothing(gateway: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.buy("alice", key='"open')
    assert (await problem_of(response))["code"] == "bad-request"
    assert await redis_snapshot(redis) == before


async def books(redis: Redis) -> dict[Any, Any]:
    """Every key as it is, but the ``decided`` statistic (it counts the requests that
    reached Redis, this one too)."""
    snapshot = await redis_snapshot(redis)
    snapshot[b"fg:{phone-1111}:state"].pop(b"decided")
    return snapshot


@pytest.fixture
def two_per_user(settings_data: dict[str, Any]) -> None:
    settings_data["campaigns"][0].update({"per_user_limit": 2, "max_quantity": 2})


@pytest.mark.usefixtures("two_per_user")
@pytest.mark.parametrize(
    "other", [{"json": {"quantity": 2}}, {"json": {"quantity": 1, "note": "gift"}}, {"data": b""}]
)
async def test_a_key_reused_with_another_request_is_422_and_changes_nothing(
    gateway: Gateway, shop: Shop, redis: Redis, other: dict[str, Any]
) -> None:
    assert (await gateway.buy("alice", key="k-1", json={"quantity": 1})).status == 201
    before = await books(redis)
    response = await gateway.buy("alice", key="k-1", **other)
    document = await problem_of(response)
    assert (response.status, document["code"]) == (422, "idempotency-key-mismatch")
    assert await books(redis) == before
    assert len(shop.seen) == 1
    # the same request again is a retry: replayed
    retry = await gateway.buy("alice", key="k-1", json={"quantity": 1})
    assert retry.status == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    await check_invariant(redis, "phone-1111", 2)


@pytest.mark.usefixtures("two_per_user")
async def test_after_sell_out_a_reused_key_is_still_told_apart(
    gateway: Gateway, settings_data: dict[str, Any], redis: Redis
) -> None:
    assert (await gateway.buy("alice", key="k-1", json={"quantity": 1})).status == 201
    response = await gateway.admin.post(
        "/campaigns/phone-1111/stock",
        json={"set": 0},
        headers={"Authorization": "Bearer test-admin-token"},
    )
    assert response.status == 200
    assert (await gateway.buy("bob")).status == 409  # the local flag is up
    mismatch = await gateway.buy("alice", key="k-1", json={"quantity": 2})
    assert (await problem_of(mismatch))["code"] == "idempotency-key-mismatch"
    retry = await gateway.buy("alice", key="k-1", json={"quantity": 1})
    assert (retry.status, retry.headers["Idempotent-Replayed"]) == (201, "true")


async def test_a_retry_while_the_first_is_in_flight_is_409_with_retry_after(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return await accept(request)

    shop.respond = slow
    first = asyncio.ensure_future(gateway.buy("alice", key="k-1"))
    await arrived.wait()
    retry = await gateway.buy("alice", key="k-1")
    document = await problem_of(retry)
    assert (retry.status, document["code"], document["state"]) == (409, "duplicate", "reserved")
    assert retry.headers["Retry-After"] in ("1", "2")
    release.set()
    assert (await first).status == 201
    await check_invariant(redis, "phone-1111", 1)


@pytest.fixture
def keys_required(settings_data: dict[str, Any]) -> None:
    settings_data["campaigns"][0]["require_idempotency_key"] = True


@pytest.mark.usefixtures("keys_required")
async def test_a_campaign_may_require_a_key(gateway: Gateway, shop: Shop, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.buy("alice")
    document = await problem_of(response)
    assert (response.status, document["code"]) == (400, "idempotency-key-required")
    assert await redis_snapshot(redis) == before
    assert (await gateway.buy("alice", key="k-1")).status == 201


def test_retry_after_is_spread_within_the_fraction() -> None:
    assert {retry_after(1, 0) for _ in range(50)} == {"1"}
    assert {retry_after(1, 0.5) for _ in range(200)} == {"1", "2"}
    spread = {int(retry_after(10, 0.3)) for _ in range(500)}
    assert spread == set(range(10, 14))
    assert {retry_after(0.2, 0.0) for _ in range(10)} == {"1"}  # never 0


@pytest.fixture
def tight_rate(settings_data: dict[str, Any]) -> None:
    settings_data["campaigns"][0]["rate_limit"] = {"rate": 1, "per": "1s", "burst": 1}
    settings_data["campaigns"][0]["stock"] = 1000


@pytest.mark.usefixtures("redis", "tight_rate")
async def test_a_crowd_told_to_retry_is_spread(new_gateway: OpenGateway) -> None:
    async with new_gateway() as gw:
        answers = [await gw.buy(f"user-{i}") for i in range(60)]
    retries = {r.headers["Retry-After"] for r in answers if r.status == 429}
    assert retries == {"1", "2"}
