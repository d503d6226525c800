"""Edge shaping: the sale window, per-client buckets, the campaign rate limit, the
stock-proportional admission budget, shadow mode, JWT identity and trusted proxies.

Every bucket here is a real Redis bucket. Where a test needs an exact count, the
bucket refills so slowly (``per: 100s``) that no token can come back during the
test; where it uses a fast bucket (5/s), the bound is the one limiter/buckets.py
promises: ``capacity + rate * (T + lease_ttl)`` over T seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from multidict import CIMultiDict
from redis.asyncio import Redis

from gateway.config import ConfigError
from gateway.embedded.server import EmbeddedRedis
from limiter.buckets import LEASE_TTL
from tests.helpers import (
    AUTH,
    Gateway,
    Shop,
    check_invariant,
    problem_of,
    raw_status,
    redis_snapshot,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.integration

CAMPAIGN = "phone-1111"
BUCKETS = f"fg:{{{CAMPAIGN}}}:cb:"
RATE_LIMIT = "rate_limit"
CLIENT_RATE_LIMIT = "client_rate_limit"
ADMISSION = "admission_ratio"

# ---------------------------------------------------------------------------- helpers


def campaign_of(settings_data: dict[str, Any]) -> dict[str, Any]:
    campaign: dict[str, Any] = settings_data["campaigns"][0]
    return campaign


@dataclass(frozen=True)
class Outcome:
    status: int
    code: str = ""
    limit: str = ""
    retry_after: int | None = None


async def outcome(response: ClientResponse) -> Outcome:
    """Status, problem code, refusing limit and Retry-After (an integer when present)."""
    if response.status < 300:
        await response.read()
        return Outcome(response.status)
    problem = await problem_of(response)
    retry = response.headers.get("Retry-After")
    if retry is not None:
        assert retry.isdigit(), f"Retry-After must be whole seconds, got {retry!r}"
    return Outcome(
        response.status,
        problem["code"],
        problem.get("limit", "") if problem["code"] == "rate-limited" else "",
        int(retry) if retry is not None else None,
    )


async def buy_each(gateway: Gateway, users: Sequence[str], **kwargs: Any) -> list[Outcome]:
    """One request after the other."""
    return [await outcome(await gateway.buy(user, **kwargs)) for user in users]


async def buy_all(gateway: Gateway, users: Sequence[str]) -> tuple[list[Outcome], float]:
    """All requests at once; returns the outcomes and the seconds the burst took."""
    start = time.monotonic()
    async with asyncio.timeout(30):  # did not hang
        responses = await asyncio.gather(*(gateway.buy(user) for user in users))
    elapsed = time.monotonic() - start
    return [await outcome(r) for r in responses], elapsed


def leased_bound(capacity: float, rate: float, elapsed: float) -> float:
    """limiter/buckets.py: in T seconds the cluster admits at most capacity + rate (T + ttl)."""
    return capacity + rate * (elapsed + LEASE_TTL)


def limited(limit: str) -> Outcome:
    """The shape of a 429 from ``limit`` (Retry-After compared separately)."""
    return Outcome(429, "rate-limited", limit)


def without_retry(o: Outcome) -> Outcome:
    return Outcome(o.status, o.code, o.limit)


async def script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


async def client_bucket_keys(redis: Redis) -> set[str]:
    return {key.decode() async for key in redis.scan_iter(match=BUCKETS + "*")}


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No periodic script calls after start-up (heartbeat, sweeper), so that INFO
    commandstats counts only what the requests under test do. Use with ``settled``."""
    monkeypatch.setattr("gateway.core.heartbeat.HEARTBEAT_SECONDS", 3600.0)
    monkeypatch.setattr("gateway.core.sweeper.BACKSTOP", 3600.0)


async def settled(redis: Redis) -> None:
    """Wait for the start-up heartbeat, the last script call a quiet gateway makes."""

    async def beat() -> bool:
        return bool(await redis.exists("fg:gateways"))

    await wait_for(beat)


async def untouched(redis: Redis) -> tuple[int, dict[Any, Any]]:
    return await script_calls(redis), await redis_snapshot(redis)


# ---------------------------------------------------------------------- 1. sale window


def _iso(moment: datetime) -> str:
    return moment.isoformat()


@pytest.fixture
def not_started(settings_data: dict[str, Any]) -> None:
    # an offset other than UTC, to show the offset is honoured
    start = datetime.now(timezone(timedelta(hours=8))) + timedelta(hours=1)
    campaign_of(settings_data).update(
        starts_at=_iso(start),
        ends_at=_iso(start + timedelta(hours=2)),
        rate_limit={"rate": 100},
        client_rate_limit={"rate": 100},
        admission_ratio=10,
    )


@pytest.fixture
def ended(settings_data: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    campaign_of(settings_data).update(
        starts_at=_iso(now - timedelta(hours=2)),
        ends_at=_iso(now - timedelta(minutes=1)),
        rate_limit={"rate": 100},
        client_rate_limit={"rate": 100},
        admission_ratio=10,
    )


@pytest.fixture
def open_window(settings_data: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    campaign_of(settings_data).update(
        starts_at=_iso(now - timedelta(minutes=1)), ends_at=_iso(now + timedelta(hours=1))
    )


@pytest.mark.usefixtures("quiet", "not_started")
async def test_before_the_start_is_not_started_and_touches_no_redis(
    gateway: Gateway, redis: Redis, shop: Shop, settings_data: dict[str, Any]
) -> None:
    configured = campaign_of(settings_data)["starts_at"]
    start = datetime.fromisoformat(configured)
    await settled(redis)
    before = await untouched(redis)

    response = await gateway.buy("alice")
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (403, "not-started")
    retry = response.headers["Retry-After"]
    assert retry.isdigit()
    left = start.timestamp() - time.time()
    assert 1 <= int(retry) <= math.ceil(left) + 1
    assert int(retry) >= 3500  # an hour away
    assert problem["starts_at"] == configured
    assert datetime.fromisoformat(problem["starts_at"]) == start
    assert problem["starts_at"].endswith("+08:00")
    for i in range(20):  # a crowd before the start: still nothing reaches Redis
        assert (await gateway.buy(f"early-{i}", key=f"k-{i}")).status == 403

    assert await untouched(redis) == before
    assert shop.seen == []
    document = await gateway.campaign()
    assert document["decided"] == 0
    assert document["process"]["refused"] == {}
    assert document["starts_at"] == configured


@pytest.mark.usefixtures("quiet", "ended")
async def test_after_the_end_is_ended_and_touches_no_redis(
    gateway: Gateway, redis: Redis, shop: Shop, settings_data: dict[str, Any]
) -> None:
    configured = campaign_of(settings_data)["ends_at"]
    await settled(redis)
    before = await untouched(redis)

    for i in range(10):
        response = await gateway.buy(f"late-{i}")
        problem = await problem_of(response)
        assert (response.status, problem["code"]) == (403, "ended")
        assert "Retry-After" not in response.headers  # no point in coming back
        assert problem["ends_at"] == configured

    assert await untouched(redis) == before
    assert shop.seen == []
    assert (await gateway.campaign())["decided"] == 0


@pytest.mark.usefixtures("open_window")
async def test_inside_the_window_buying_works(gateway: Gateway, shop: Shop, redis: Redis) -> None:
    assert (await gateway.buy("alice")).status == 201
    assert len(shop.seen) == 1
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert state["sold"] == 1


@pytest.fixture
def opens_shortly(settings_data: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    campaign_of(settings_data).update(
        starts_at=_iso(now + timedelta(seconds=0.8)), ends_at=_iso(now + timedelta(seconds=1.8))
    )


async def _sleep_until(moment: datetime) -> None:
    """Let the clock pass ``moment`` (the scenario: a window opens or closes), not a wait
    for background work."""
    await asyncio.sleep(max(0.0, moment.timestamp() - time.time()) + 0.05)


@pytest.mark.usefixtures("opens_shortly")
async def test_window_opens_and_closes_on_time(
    gateway: Gateway, settings_data: dict[str, Any]
) -> None:
    start = datetime.fromisoformat(campaign_of(settings_data)["starts_at"])
    end = datetime.fromisoformat(campaign_of(settings_data)["ends_at"])
    early = await outcome(await gateway.buy("alice"))
    assert (early.status, early.code, early.retry_after) == (403, "not-started", 1)
    await _sleep_until(start)
    assert (await gateway.buy("alice")).status == 201
    await _sleep_until(end)
    late = await outcome(await gateway.buy("bob"))
    assert (late.status, late.code, late.retry_after) == (403, "ended", None)


# ------------------------------------------------------------------ 2. per-client bucket


@pytest.fixture
def per_user_bucket(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data)["client_rate_limit"] = {"rate": 2, "burst": 2, "key": "user"}


@pytest.mark.usefixtures("per_user_bucket")
async def test_client_bucket_keyed_by_user(gateway: Gateway, redis: Redis, shop: Shop) -> None:
    first, second, third = await buy_each(gateway, ["alice"] * 3)
    assert first.status == 201
    assert (second.status, second.code) == (403, "limit-exceeded")  # passed the bucket
    assert without_retry(third) == limited(CLIENT_RATE_LIMIT)
    assert third.retry_after is not None
    assert third.retry_after >= 1
    # another user has a bucket of their own
    assert (await gateway.buy("bob")).status == 201
    # alice is still refused (remembered locally until her next token)
    again = await outcome(await gateway.buy("alice"))
    assert without_retry(again) == limited(CLIENT_RATE_LIMIT)

    assert await client_bucket_keys(redis) == {BUCKETS + "user:alice", BUCKETS + "user:bob"}
    document = await gateway.campaign()
    assert document["process"]["refused"] == {CLIENT_RATE_LIMIT: 2}
    assert document["process"]["shadowed"] == {}
    assert document["decided"] == 3  # alice twice, bob once
    assert len(shop.seen) == 2
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.fixture
def per_ip_bucket(settings_data: dict[str, Any]) -> None:
    # two requests per IP, then nothing for the rest of the test (0.02 tokens/s)
    campaign_of(settings_data)["client_rate_limit"] = {"rate": 2, "per": "100s", "key": "ip"}


@pytest.fixture(params=[[], ["10.0.0.0/8"]], ids=["no-trusted-proxies", "peer-not-trusted"])
def untrusted_peer(request: pytest.FixtureRequest, settings_data: dict[str, Any]) -> None:
    settings_data["gateway"]["trusted_proxies"] = request.param


@pytest.mark.usefixtures("per_ip_bucket", "untrusted_peer")
async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    gateway: Gateway, redis: Redis, shop: Shop
) -> None:
    spoofs = ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4, 10.0.0.1"]
    results = [
        await outcome(await gateway.buy(f"u{i}", headers={"X-Forwarded-For": spoof}))
        for i, spoof in enumerate(spoofs)
    ]
    assert [r.status for r in results] == [201, 201, 429, 429]
    assert {without_retry(r) for r in results[2:]} == {limited(CLIENT_RATE_LIMIT)}
    # one bucket, the peer's
    assert await client_bucket_keys(redis) == {BUCKETS + "ip:127.0.0.1"}
    # the backend hears the real peer, not the client's story
    assert [s.headers["X-Forwarded-For"] for s in shop.seen] == ["127.0.0.1", "127.0.0.1"]


@pytest.fixture
def behind_trusted_proxies(settings_data: dict[str, Any]) -> None:
    settings_data["gateway"]["trusted_proxies"] = ["127.0.0.1/32", "10.0.0.0/8"]


def _xff(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


@pytest.mark.usefixtures("per_ip_bucket", "behind_trusted_proxies")
async def test_trusted_proxy_forwarded_for_picks_the_rightmost_untrusted_hop(
    gateway: Gateway, redis: Redis, shop: Shop
) -> None:
    async def buy(user: str, forwarded: str | None) -> Outcome:
        headers = _xff(forwarded) if forwarded is not None else {}
        return await outcome(await gateway.buy(user, headers=headers))

    # 1.1.1.1 gets its two tokens, then is refused
    assert [(await buy(f"a{i}", "1.1.1.1")).status for i in range(3)] == [201, 201, 429]
    # a different client address has its own bucket
    assert (await buy("b", "2.2.2.2")).status == 201
    # the rightmost hop that is not a trusted proxy is the client
    assert (await buy("c", "6.6.6.6, 10.0.0.1")).status == 201
    # ... even when something further left claims otherwise (anyone can write that part)
    assert (await buy("d", "9.9.9.9, 6.6.6.6, 10.0.0.2")).status == 201
    third = await buy("e", "6.6.6.6")
    assert without_retry(third) == limited(CLIENT_RATE_LIMIT)
    # a trusted proxy that forwards no header: the proxy itself is the client
    assert (await buy("f", None)).status == 201

    assert await client_bucket_keys(redis) == {
        BUCKETS + "ip:1.1.1.1",
        BUCKETS + "ip:2.2.2.2",
        BUCKETS + "ip:6.6.6.6",
        BUCKETS + "ip:127.0.0.1",
    }
    forwarded = [(s.headers["X-User-Id"], s.headers["X-Forwarded-For"]) for s in shop.seen]
    assert forwarded == [
        ("a0", "1.1.1.1, 127.0.0.1"),
        ("a1", "1.1.1.1, 127.0.0.1"),
        ("b", "2.2.2.2, 127.0.0.1"),
        ("c", "6.6.6.6, 10.0.0.1, 127.0.0.1"),
        ("d", "6.6.6.6, 10.0.0.2, 127.0.0.1"),  # nothing left of the client: anyone wrote it
        ("f", "127.0.0.1"),
    ]


@pytest.mark.usefixtures("per_ip_bucket", "behind_trusted_proxies")
async def test_ipv6_clients_share_the_bucket_of_their_64(gateway: Gateway, redis: Redis) -> None:
    # one subscriber's /64 holds 2^64 addresses: a fresh one per request must not help
    addresses = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"]
    statuses = [
        (await gateway.buy(f"v{i}", headers=_xff(address))).status
        for i, address in enumerate(addresses)
    ]
    assert statuses == [201, 201, 429]
    assert (await gateway.buy("w", headers=_xff("2001:db8:1:3::1"))).status == 201
    assert await client_bucket_keys(redis) == {
        BUCKETS + "ip:2001:db8:1:2::/64",
        BUCKETS + "ip:2001:db8:1:3::/64",
    }


@pytest.mark.usefixtures("per_ip_bucket", "behind_trusted_proxies")
async def test_garbled_forwarded_hop_trusts_nothing_further_left(
    gateway: Gateway, redis: Redis
) -> None:
    # "6.6.6.6" sits left of garbage: not believed; the hop right of the garbage is used
    response = await gateway.buy("a", headers=_xff("6.6.6.6, not-an-ip, 10.0.0.7"))
    assert response.status == 201
    assert await client_bucket_keys(redis) == {BUCKETS + "ip:10.0.0.7"}


def _two_forwarded_headers() -> CIMultiDict[str]:
    return CIMultiDict(
        [("X-User-Id", "alice"), ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")]
    )


@pytest.mark.usefixtures("per_ip_bucket", "behind_trusted_proxies")
async def test_several_forwarded_for_headers_form_one_chain(gateway: Gateway, redis: Redis) -> None:
    response = await gateway.edge.post("/seckill/phone-1111", headers=_two_forwarded_headers())
    assert response.status == 201
    assert await client_bucket_keys(redis) == {BUCKETS + "ip:2.2.2.2"}


@pytest.mark.usefixtures("per_ip_bucket", "behind_trusted_proxies")
async def test_backend_hears_every_forwarded_for_header(gateway: Gateway, shop: Shop) -> None:
    response = await gateway.edge.post("/seckill/phone-1111", headers=_two_forwarded_headers())
    assert response.status == 201
    # the client the gateway determined (the rightmost untrusted hop), then the trusted
    # proxies: what a client wrote further left never reaches the backend
    assert shop.seen[0].headers["X-Forwarded-For"] == "2.2.2.2, 127.0.0.1"


# ---------------------------------------------------------------- 3. campaign rate limit


@pytest.fixture
def rate_limited(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(stock=1000, rate_limit={"rate": 5, "per": "1s", "burst": 5})


@pytest.mark.usefixtures("rate_limited")
async def test_campaign_rate_limit_admits_the_burst_and_refuses_the_rest(
    gateway: Gateway, redis: Redis
) -> None:
    results, elapsed = await buy_all(gateway, [f"user-{i}" for i in range(20)])
    admitted = [r for r in results if r.status == 201]
    refused = [r for r in results if r.status != 201]
    # the burst is never refused; beyond it, at most what the rate and a lease's slack allow
    assert 5 <= len(admitted) <= leased_bound(5, 5, elapsed), (len(admitted), elapsed)
    assert refused
    assert {without_retry(r) for r in refused} == {limited(RATE_LIMIT)}
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in refused)

    document = await gateway.campaign()
    assert document["decided"] == len(admitted)
    assert document["process"]["refused"] == {RATE_LIMIT: len(refused)}
    assert document["limits"][RATE_LIMIT]["mode"] == "enforce"
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)

    # Retry-After is honest: after it, the bucket has refilled (the sleep lets the promised
    # time pass: the scenario, not a wait for background work)
    await asyncio.sleep(max(r.retry_after or 1 for r in refused))
    assert (await gateway.buy("patient")).status == 201


# ---------------------------------------------------------------- 4. admission budget


@pytest.fixture
def admission(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(stock=4, admission_ratio=2)


@pytest.mark.usefixtures("admission")
async def test_admission_ratio_lets_about_ratio_times_stock_reach_the_deduction(
    gateway: Gateway, redis: Redis, shop: Shop
) -> None:
    results, elapsed = await buy_all(gateway, [f"user-{i}" for i in range(50)])
    document = await gateway.campaign()
    assert document["limits"][ADMISSION] == {"ratio": 2.0, "window": 1.0, "mode": "enforce"}
    decided = document["decided"]
    # capacity 2 x 4 = 8, refilled at 8/s (it only shrinks as stock sells)
    assert 1 <= decided <= leased_bound(8, 8, elapsed), (decided, elapsed)

    kinds = Counter(without_retry(r) for r in results)
    assert set(kinds) <= {Outcome(201), Outcome(409, "sold-out"), limited(ADMISSION)}, kinds
    assert kinds[Outcome(201)] == 4
    # the rest: 429 from the admission, or sold-out once nothing is left
    assert all(r.retry_after and r.retry_after >= 1 for r in results if r.status == 429)
    refused = document["process"]["refused"]
    assert set(refused) <= {ADMISSION}
    assert refused.get(ADMISSION, 0) == kinds[limited(ADMISSION)]
    assert len(shop.seen) == 4
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["reserved"], state["sold"]) == (0, 0, 4)

    # Sold out: a request without a key is answered locally and reaches nothing; one with
    # an Idempotency-Key is looked up (Redis may owe it a stored answer), and one whose key
    # names nothing is sold-out: neither reaches the deduction.
    await asyncio.sleep(2 * LEASE_TTL)  # a deadline passes (the scenario): leased tokens expire
    plain = await outcome(await gateway.buy("late"))
    assert (plain.status, plain.code) == (409, "sold-out")
    late = await outcome(await gateway.buy("late", key="late-1"))
    assert (late.status, late.code) == (409, "sold-out")
    assert (await gateway.campaign())["decided"] == decided
    assert CAMPAIGN in gateway.runtime.watch.sold_out


@pytest.fixture
def admission_shadow_mapping(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        stock=4, admission_ratio={"ratio": 2, "window": "1s", "mode": "shadow"}
    )


@pytest.mark.usefixtures("admission_shadow_mapping")
async def test_admission_ratio_mapping_form_in_shadow_mode(gateway: Gateway, redis: Redis) -> None:
    results, elapsed = await buy_all(gateway, [f"user-{i}" for i in range(50)])
    document = await gateway.campaign()
    assert document["limits"][ADMISSION] == {"ratio": 2.0, "window": 1.0, "mode": "shadow"}
    kinds = Counter(results)
    assert set(kinds) <= {Outcome(201), Outcome(409, "sold-out")}, kinds
    assert kinds[Outcome(201)] == 4
    assert document["process"]["refused"] == {}
    # Every request that reached the deduction either spent a budget token or was
    # shadowed. The first lease comes from a full bucket, so at least one token was
    # spent; at most the leased bound were.
    shadowed = document["process"]["shadowed"].get(ADMISSION, 0)
    decided = document["decided"]
    assert decided - leased_bound(8, 8, elapsed) <= shadowed <= decided - 1
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert state["sold"] == 4


@pytest.fixture
def admission_below_one(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(stock=3, admission_ratio=0.5)


@pytest.mark.usefixtures("admission_below_one")
async def test_a_ratio_below_one_still_sells_the_last_units(gateway: Gateway, redis: Redis) -> None:
    # 0.5 x 1 left is half a request: the budget still lets one through
    sold = 0
    for i in range(200):  # the budget refills at 1 a second; a few seconds at most
        if (await gateway.buy(f"user-{i}")).status == 201:
            sold += 1
            if sold == 3:
                break
        await asyncio.sleep(0.05)  # pacing the buyers (the scenario), not a wait
    assert sold == 3
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["available"], state["sold"]) == (0, 3)


@pytest.fixture
def one_unit_with_admission(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(stock=1, admission_ratio=2)


@pytest.mark.usefixtures("one_unit_with_admission")
async def test_restocked_campaign_sells_again_with_admission(
    gateway: Gateway, redis: Redis
) -> None:
    assert (await gateway.buy("alice")).status == 201
    # the admission learns the campaign is sold out
    assert (await outcome(await gateway.buy("bob", key="b-1"))).code == "sold-out"
    restock = await gateway.admin.post(
        f"/campaigns/{CAMPAIGN}/stock", json={"delta": 1}, headers=AUTH
    )
    assert restock.status == 200

    async def bob_buys() -> bool:
        return (await gateway.buy("bob")).status == 201

    # the admission remembers "exhausted" for up to a second; then bob gets the unit
    await wait_for(bob_buys, within=5.0)
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["sold"], state["available"]) == (2, 0)


@pytest.mark.usefixtures("admission")
async def test_vanished_counters_are_unavailable_not_sold_out(
    gateway: Gateway, redis: Redis
) -> None:
    """Redis lost the campaign (a flush, a failover to an empty replica): buyers get 503
    and readiness names the campaign; the running gateway never recreates its stock."""
    for user in ("alice", "bob", "carol", "dave"):
        assert (await gateway.buy(user)).status == 201
    assert (await outcome(await gateway.buy("erin"))).code == "sold-out"
    await redis.delete(f"fg:{{{CAMPAIGN}}}:state")

    async def reported_missing() -> bool:
        ready = await gateway.admin.get("/readyz")
        return ready.status == 503 and (await ready.json())["campaigns_missing"] == [CAMPAIGN]

    await wait_for(reported_missing, within=5.0)
    assert (await outcome(await gateway.buy("frank"))).code == "unavailable"
    assert await redis.exists(f"fg:{{{CAMPAIGN}}}:state") == 0


@pytest.mark.usefixtures("one_unit_with_admission")
async def test_idempotent_retry_of_the_last_winner_is_replayed_with_admission(
    gateway: Gateway, shop: Shop
) -> None:
    first = await gateway.buy("alice", key="order-1")
    assert first.status == 201
    retry = await gateway.buy("alice", key="order-1")
    assert retry.status == 201, await retry.text()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert len(shop.seen) == 1


# --------------------------------------------------------------------- 5. shadow mode

# Each scenario: the limit's settings, the buyers in order (sequential) and how many of
# them enforce mode refuses. The buckets refill at most once per 33 s, so the count
# is exact: a token is granted once by Redis, and a lease of one token is spent by the
# request that asked for it.
SCENARIOS: dict[str, tuple[dict[str, Any], list[str], int]] = {
    CLIENT_RATE_LIMIT: (
        {"stock": 10, CLIENT_RATE_LIMIT: {"rate": 2, "per": "100s", "key": "ip"}},
        [f"u{i}" for i in range(8)],
        6,
    ),
    RATE_LIMIT: (
        {"stock": 10, RATE_LIMIT: {"rate": 3, "per": "100s"}},
        [f"u{i}" for i in range(8)],
        5,
    ),
    # 1 x 4 = 4 tokens; alice wins one unit (capacity 3 now) and repeats
    ADMISSION: (
        {"stock": 4, ADMISSION: {"ratio": 1, "window": "100s"}},
        ["alice"] * 5 + ["bob", "carol"],
        3,
    ),
}


@pytest.fixture(params=["enforce", "shadow"])
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(params=list(SCENARIOS))
def scenario(
    request: pytest.FixtureRequest, mode: str, settings_data: dict[str, Any]
) -> tuple[str, list[str], int]:
    limit: str = request.param
    config, users, refusals = SCENARIOS[limit]
    campaign = campaign_of(settings_data)
    campaign.update(json.loads(json.dumps(config)))
    campaign[limit] = {**campaign[limit], "mode": mode}
    return limit, users, refusals


@pytest.mark.usefixtures("scenario")  # configured before the gateway starts
async def test_shadow_mode_counts_exactly_what_enforce_refuses(
    scenario: tuple[str, list[str], int], mode: str, gateway: Gateway, redis: Redis
) -> None:
    limit, users, refusals = scenario
    results = await buy_each(gateway, users)
    process = (await gateway.campaign())["process"]
    kinds = Counter(without_retry(r) for r in results)
    repeats = len(users) - len(set(users))
    if mode == "enforce":
        assert kinds[limited(limit)] == refusals, kinds
        assert process["refused"] == {limit: refusals}
        assert process["shadowed"] == {}
    else:
        # nobody is refused: every buyer wins (stock suffices), repeats hit their limit
        assert kinds == Counter(
            {Outcome(201): len(set(users)), Outcome(403, "limit-exceeded"): repeats}
        )
        assert process["shadowed"] == {limit: refusals}
        assert process["refused"] == {}
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.fixture
def everything_shadowed(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        stock=3,
        client_rate_limit={"rate": 1, "per": "100s", "key": "ip", "mode": "shadow"},
        rate_limit={"rate": 1, "per": "100s", "mode": "shadow"},
        # 0.5 x 3 = 1.5: one token for u0, then the budget shrinks with the stock
        admission_ratio={"ratio": 0.5, "window": "100s", "mode": "shadow"},
    )


@pytest.mark.usefixtures("everything_shadowed")
async def test_shadow_mode_sells_the_whole_stock(
    gateway: Gateway, redis: Redis, shop: Shop
) -> None:
    results = await buy_each(gateway, [f"u{i}" for i in range(6)] + ["u0"])
    # winners up to the stock; the rest hear sold-out, never a limit
    assert results[:3] == [Outcome(201)] * 3
    assert set(results[3:]) == {Outcome(409, "sold-out")}
    process = (await gateway.campaign())["process"]
    assert process["refused"] == {}
    # u0, u1 and u2 reached the limits and only u0 found a token of each kind; later
    # buyers may or may not reach them (the sold-out flag may answer first)
    shadowed = process["shadowed"]
    assert set(shadowed) == {CLIENT_RATE_LIMIT, RATE_LIMIT, ADMISSION}
    assert all(2 <= count <= 6 for count in shadowed.values()), shadowed
    assert len(shop.seen) == 3
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert (state["sold"], state["available"]) == (3, 0)


@pytest.fixture
def fast_rate_shadowed(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        stock=100, rate_limit={"rate": 5, "per": "1s", "burst": 5, "mode": "shadow"}
    )


@pytest.mark.usefixtures("fast_rate_shadowed")
async def test_shadowed_rate_limit_count_is_within_the_leasing_bound(
    gateway: Gateway, redis: Redis
) -> None:
    results, elapsed = await buy_all(gateway, [f"user-{i}" for i in range(20)])
    assert set(results) == {Outcome(201)}
    process = (await gateway.campaign())["process"]
    shadowed = process["shadowed"].get(RATE_LIMIT, 0)
    # Enforce mode would have admitted between the burst (5: every leased token is
    # spent by a waiting request) and the leased bound, so it refuses 20 minus that.
    assert 20 - leased_bound(5, 5, elapsed) <= shadowed <= 15, (shadowed, elapsed)
    assert process["refused"] == {}
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


# ------------------------------------------------------------------------------ 6. JWT

SECRET = "flashgate-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCD"  # 64 bytes
OTHER_SECRET = "someone-elses-secret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDE"
AUDIENCE = "flashgate-shop"
ISSUER = "https://id.example.test"


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for "jwt-alice"; a change to None removes the claim."""
    now = int(time.time())
    result: dict[str, Any] = {
        "sub": "jwt-alice",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
    }
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def hs(payload: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"


def unsigned(payload: dict[str, Any]) -> str:
    return _segments({"alg": "none", "typ": "JWT"}, payload) + "."


def forged_hs256(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""
    signing_input = _segments({"alg": "HS256", "typ": "JWT"}, payload)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def tampered() -> str:
    header, _, signature = hs(claims()).split(".")
    payload = _b64(json.dumps(claims(sub="jwt-admin")).encode())
    return f"{header}.{payload}.{signature}"


@pytest.fixture
def hs256(settings_data: dict[str, Any]) -> None:
    settings_data["identity"]["jwt"] = {"secret": SECRET, "audience": AUDIENCE, "issuer": ISSUER}
    # generous, slow-refilling limits: a request that got past identity would write buckets
    campaign_of(settings_data).update(
        rate_limit={"rate": 100, "per": "100s"},
        client_rate_limit={"rate": 10, "per": "100s"},
        admission_ratio=10,
    )


@pytest.mark.usefixtures("hs256")
async def test_valid_token_buys_as_its_subject(gateway: Gateway, shop: Shop, redis: Redis) -> None:
    token = hs(claims())
    response = await gateway.buy("mallory", headers=bearer(token))  # X-User-Id: mallory
    assert response.status == 201
    assert shop.seen[0].headers["X-User-Id"] == "jwt-alice"
    assert await redis.hkeys(f"fg:{{{CAMPAIGN}}}:users") == [b"jwt-alice"]
    # the same subject under another header is still the same buyer
    again = await outcome(await gateway.buy("someone-else", headers=bearer(hs(claims()))))
    assert (again.status, again.code) == (403, "limit-exceeded")
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


REFUSED_TOKENS: dict[str, Callable[[], dict[str, str]]] = {
    "expired": lambda: bearer(hs(claims(exp=int(time.time()) - 60))),
    "without-exp": lambda: bearer(hs(claims(exp=None))),
    "wrong-signature": lambda: bearer(hs(claims(), key=OTHER_SECRET)),
    "tampered-payload": lambda: bearer(tampered()),
    "wrong-audience": lambda: bearer(hs(claims(aud="another-shop"))),
    "without-audience": lambda: bearer(hs(claims(aud=None))),
    "wrong-issuer": lambda: bearer(hs(claims(iss="https://evil.example"))),
    "without-issuer": lambda: bearer(hs(claims(iss=None))),
    "without-subject": lambda: bearer(hs(claims(sub=None))),
    "subject-with-newline": lambda: bearer(hs(claims(sub="jwt-alice\n"))),
    "exp-beyond-any-float": lambda: bearer(hs(claims(exp=10**400))),
    "not-yet-valid": lambda: bearer(hs(claims(nbf=int(time.time()) + 300))),
    "alg-none": lambda: bearer(unsigned(claims())),
    "algorithm-not-allowed": lambda: bearer(hs(claims(), algorithm="HS512")),
    "garbage": lambda: bearer("this-is-not-a-jwt"),
    "three-garbage-segments": lambda: bearer("a.b.c"),
    "missing-authorization": dict,
    "basic-scheme": lambda: {"Authorization": "Basic " + _b64(b"jwt-alice:password")},
    "token-scheme": lambda: {"Authorization": "Token " + hs(claims())},
    "bearer-without-token": lambda: {"Authorization": "Bearer "},
}


@pytest.mark.usefixtures("hs256")
async def test_token_that_is_not_ascii_is_unauthenticated(gateway: Gateway, redis: Redis) -> None:
    await settled(redis)
    before = await untouched(redis)
    head = f"POST /seckill/{CAMPAIGN} HTTP/1.1\r\nHost: x\r\n".encode()
    for token in (b"\xff\xfe.\x80.x", "a.bé.c".encode()):
        assert (
            await raw_status(gateway.edge, head + b"Authorization: Bearer " + token + b"\r\n")
            == 401
        )
    assert await untouched(redis) == before


@pytest.mark.usefixtures("quiet", "hs256")
@pytest.mark.parametrize("case", list(REFUSED_TOKENS))
async def test_bad_or_missing_token_is_unauthenticated_and_changes_nothing(
    case: str, gateway: Gateway, redis: Redis, shop: Shop
) -> None:
    headers = REFUSED_TOKENS[case]()
    await settled(redis)
    before = await untouched(redis)
    response = await gateway.buy("alice", headers=headers)  # X-User-Id: alice is ignored
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (401, "unauthenticated"), problem
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await untouched(redis) == before
    assert shop.seen == []


@pytest.mark.usefixtures("hs256")
@pytest.mark.parametrize("subject", ["", "tab\tinside"])
async def test_unusable_subject_is_refused_with_a_bearer_challenge(
    subject: str, gateway: Gateway, shop: Shop
) -> None:
    response = await gateway.buy(None, headers=bearer(hs(claims(sub=subject))))
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (401, "unauthenticated")
    assert shop.seen == []
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.usefixtures("hs256")
async def test_remembered_token_is_refused_once_it_expires(gateway: Gateway) -> None:
    expiry = math.ceil(time.time()) + 1
    token = hs(claims(exp=expiry))
    assert (await gateway.buy(None, headers=bearer(token))).status == 201
    cached = await outcome(await gateway.buy(None, headers=bearer(token)))
    assert (cached.status, cached.code) == (403, "limit-exceeded")
    await asyncio.sleep(max(0.0, expiry - time.time()) + 0.1)  # the token's expiry passes
    expired = await outcome(await gateway.buy(None, headers=bearer(token)))
    assert (expired.status, expired.code) == (401, "unauthenticated")


@pytest.fixture
def short_secret(settings_data: dict[str, Any]) -> None:
    settings_data["identity"]["jwt"] = {"secret": SECRET[:32]}


@pytest.mark.usefixtures("short_secret")
async def test_shortest_accepted_secret_verifies_without_warnings(gateway: Gateway) -> None:
    token = hs(claims(aud=None, iss=None), key=SECRET[:32])
    response = await gateway.buy(None, headers=bearer(token))
    assert response.status == 201, await response.text()


@pytest.mark.parametrize(("algorithm", "length"), [("HS256", 31), ("HS384", 47), ("HS512", 63)])
def test_secrets_shorter_than_the_hash_are_refused(
    settings_data: dict[str, Any], algorithm: str, length: int
) -> None:
    settings_data["identity"]["jwt"] = {"algorithms": [algorithm], "secret": SECRET[:length]}
    with pytest.raises(ConfigError, match=r"identity\.jwt\.secret"):
        settings_for(settings_data)


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture(scope="module")
def ec_keys() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]:
    return ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())


def public_pem(key: PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(params=["RS256", "ES256"])
def asymmetric(
    request: pytest.FixtureRequest, settings_data: dict[str, Any]
) -> tuple[str, PrivateKey, PrivateKey]:
    algorithm: str = request.param
    keys: tuple[PrivateKey, PrivateKey] = request.getfixturevalue(
        "rsa_keys" if algorithm == "RS256" else "ec_keys"
    )
    settings_data["identity"]["jwt"] = {
        "algorithms": [algorithm],
        "public_key": public_pem(keys[0]),
        "audience": AUDIENCE,
        "issuer": ISSUER,
    }
    return algorithm, keys[0], keys[1]


@pytest.mark.usefixtures("asymmetric")  # configured before the gateway starts
async def test_asymmetric_token_buys_and_confusion_is_refused(
    asymmetric: tuple[str, PrivateKey, PrivateKey], gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    algorithm, key, stranger = asymmetric
    before = await redis_snapshot(redis)
    refusals = {
        # HS256 with the public key as the HMAC secret: the classic algorithm confusion
        "confused": forged_hs256(claims(sub="jwt-mallory"), public_pem(key).encode()),
        "stranger": jwt.encode(claims(sub="jwt-mallory"), stranger, algorithm=algorithm),
        "unsigned": unsigned(claims(sub="jwt-mallory")),
    }
    for name, token in refusals.items():
        response = await gateway.buy(None, headers=bearer(token))
        problem = await problem_of(response)
        assert (response.status, problem["code"]) == (401, "unauthenticated"), name
    assert await redis_snapshot(redis) == before
    assert shop.seen == []

    good = jwt.encode(claims(sub="jwt-bob"), key, algorithm=algorithm)
    assert (await gateway.buy("mallory", headers=bearer(good))).status == 201
    assert [s.headers["X-User-Id"] for s in shop.seen] == ["jwt-bob"]


@pytest.fixture
def uid_claim(settings_data: dict[str, Any]) -> None:
    settings_data["identity"]["jwt"] = {"secret": SECRET, "claim": "uid"}


@pytest.mark.usefixtures("uid_claim")
async def test_custom_user_claim(gateway: Gateway, shop: Shop) -> None:
    def token(**changes: Any) -> dict[str, str]:
        return bearer(hs(claims(aud=None, iss=None, sub="not-the-user", **changes)))

    assert (await gateway.buy(None, headers=token(uid="u-42"))).status == 201
    assert (await gateway.buy(None, headers=token(uid=42))).status == 201  # a number: "42"
    for bad in (token(), token(uid=True), token(uid=["u-1"])):
        response = await gateway.buy(None, headers=bad)
        assert (response.status, (await problem_of(response))["code"]) == (401, "unauthenticated")
    assert [s.headers["X-User-Id"] for s in shop.seen] == ["u-42", "42"]


# --------------------------------------------------------------------- 7. limits' order


@pytest.fixture
def client_then_rate(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        stock=100,
        client_rate_limit={"rate": 1, "per": "100s", "key": "user"},
        rate_limit={"rate": 5, "per": "100s"},
    )


@pytest.mark.usefixtures("client_then_rate")
async def test_client_refusals_spend_no_campaign_rate_tokens(gateway: Gateway) -> None:
    alice = await buy_each(gateway, ["alice"] * 10)
    assert alice[0] == Outcome(201)
    assert {without_retry(r) for r in alice[1:]} == {limited(CLIENT_RATE_LIMIT)}
    # the campaign's 5 tokens: alice spent one, four remain for others
    others = await buy_each(gateway, ["b", "c", "d", "e", "f"])
    assert [r.status for r in others] == [201, 201, 201, 201, 429]
    assert others[-1].limit == RATE_LIMIT
    document = await gateway.campaign()
    assert document["decided"] == 5
    assert document["process"]["refused"] == {CLIENT_RATE_LIMIT: 9, RATE_LIMIT: 1}


@pytest.fixture
def client_then_admission(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        stock=3,
        client_rate_limit={"rate": 1, "per": "100s", "key": "user"},
        admission_ratio={"ratio": 1, "window": "100s"},
    )


@pytest.mark.usefixtures("client_then_admission")
async def test_client_refusals_spend_no_admission_budget(gateway: Gateway, redis: Redis) -> None:
    # budget 1 x 3: alice's one admission leaves exactly enough for bob and carol
    alice = await buy_each(gateway, ["alice"] * 10)
    assert alice[0] == Outcome(201)
    assert {without_retry(r) for r in alice[1:]} == {limited(CLIENT_RATE_LIMIT)}
    assert await buy_each(gateway, ["bob", "carol"]) == [Outcome(201), Outcome(201)]
    document = await gateway.campaign()
    assert document["decided"] == 3
    assert document["process"]["refused"] == {CLIENT_RATE_LIMIT: 9}
    state = await check_invariant(redis, CAMPAIGN, per_user_limit=1)
    assert state["sold"] == 3


@pytest.fixture
def rate_then_admission(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        stock=10,
        rate_limit={"rate": 2, "per": "100s"},
        admission_ratio={"ratio": 0.5, "window": "100s"},
    )


@pytest.mark.usefixtures("rate_then_admission")
async def test_rate_refusals_spend_no_admission_budget(gateway: Gateway, redis: Redis) -> None:
    results = await buy_each(gateway, [f"u{i}" for i in range(8)])
    assert results[:2] == [Outcome(201), Outcome(201)]
    assert {without_retry(r) for r in results[2:]} == {limited(RATE_LIMIT)}
    # the admission budget (0.5 x 10 = 5) lost only the two admitted requests' tokens
    tokens = float(await redis.hget(f"fg:{{{CAMPAIGN}}}:admit", "tokens") or -1)
    assert 3 <= tokens < 4
    assert (await gateway.campaign())["decided"] == 2


# ----------------------------------------------------------------------- 8. Redis down


@pytest.fixture
def every_limit(settings_data: dict[str, Any]) -> None:
    campaign_of(settings_data).update(
        rate_limit={"rate": 100},
        client_rate_limit={"rate": 100, "key": "ip"},
        admission_ratio=5,
    )


@pytest.mark.usefixtures("every_limit")
async def test_redis_down_fails_closed_with_limits(
    gateway: Gateway, shop: Shop, redis_server: EmbeddedRedis
) -> None:
    assert (await gateway.buy("before")).status == 201
    redis_server.stop()
    try:
        async with asyncio.timeout(20):  # did not hang
            for i in range(5):
                response = await gateway.buy(f"user-{i}")
                problem = await problem_of(response)
                assert (response.status, problem["code"]) == (503, "unavailable"), problem
                assert response.headers["Retry-After"] in ("1", "2")  # spread by the jitter
    finally:
        redis_server.start()
    assert [s.headers["X-User-Id"] for s in shop.seen] == ["before"]
