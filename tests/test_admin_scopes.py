"""Scoped admin tokens (each call needs its scope; the ledger names the token) and the
dead letters: listed, replayed with their stock taken again, or refused with a reason."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.helpers import (
    AUTH,
    Gateway,
    OpenGateway,
    Shop,
    accept,
    check_invariant,
    ledger,
    problem_of,
    wait_for,
)

BACKEND = {"Authorization": "Bearer backend-secret"}
VIEWER = {"Authorization": "Bearer viewer-secret"}
BASE = "fg:{phone-1111}"


@pytest.fixture
def scoped(settings_data: dict[str, Any]) -> None:
    settings_data["admin"]["tokens"] = [
        {"name": "backend", "token": "backend-secret", "scopes": ["confirm"]},
        {"name": "viewer", "token": "viewer-secret", "scopes": ["read"]},
    ]


#: (method, path, body, the scope it needs)
CALLS: list[tuple[str, str, Any, str]] = [
    ("GET", "/campaigns", None, "read"),
    ("GET", "/campaigns/phone-1111", None, "read"),
    ("GET", "/campaigns/phone-1111/dead-letters", None, "read"),
    ("POST", "/campaigns/phone-1111/stock", {"delta": 1}, "stock"),
    ("POST", "/campaigns/phone-1111/dead-letters/replay", {"ids": []}, "reservations"),
    ("GET", "/reservations/phone-1111.0123456789abcdef0123", None, "reservations"),
    ("POST", "/reservations/phone-1111.0123456789abcdef0123/cancel", None, "reservations"),
    ("POST", "/reservations/phone-1111.0123456789abcdef0123/confirm", None, "confirm"),
    ("POST", "/reload", None, "reload"),
]


@pytest.mark.usefixtures("scoped")
@pytest.mark.parametrize(("method", "path", "body", "scope"), CALLS)
async def test_a_token_without_the_scope_is_forbidden(
    gateway: Gateway, method: str, path: str, body: Any, scope: str
) -> None:
    for headers, scopes in ((BACKEND, {"confirm"}), (VIEWER, {"read"})):
        response = await gateway.admin.request(method, path, headers=headers, json=body)
        if scope in scopes:
            assert response.status not in (401, 403), await response.text()
            continue
        document = await problem_of(response)
        assert (response.status, document["code"], document["scope"]) == (403, "forbidden", scope)
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    # admin.token keeps every scope
    response = await gateway.admin.request(method, path, headers=AUTH, json=body)
    assert response.status not in (401, 403), await response.text()


@pytest.mark.usefixtures("scoped")
async def test_a_bad_token_is_401_with_a_challenge(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer backend-secreT"}, {"Authorization": "Basic x"}):
        response = await gateway.admin.get("/campaigns", headers=headers)
        assert (await problem_of(response))["code"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.usefixtures("scoped")
async def test_the_ledger_names_the_token(gateway: Gateway, redis: Redis) -> None:
    stock = {"Authorization": "Bearer stock-secret"}
    settings = gateway.runtime.live.current.settings
    assert settings.admin is not None
    # the tokens come from the snapshot in force: a new one is taken on the next call
    from dataclasses import replace

    from gateway.config.settings import AdminToken

    more = (*settings.admin.tokens, AdminToken("warehouse", "stock-secret", ("stock",)))
    gateway.runtime.live.current = replace(
        gateway.runtime.live.current,
        settings=replace(settings, admin=replace(settings.admin, tokens=more)),
    )
    response = await gateway.admin.post(
        "/campaigns/phone-1111/stock", json={"delta": 2}, headers=stock
    )
    assert response.status == 200, await response.text()
    response = await gateway.admin.post(
        "/campaigns/phone-1111/stock", json={"delta": 1}, headers={**stock, "X-Actor": "jane"}
    )
    assert response.status == 200
    actors = [e["by"] for e in await ledger(redis, "phone-1111") if e["op"] == "adjust"]
    assert actors == ["warehouse", "warehouse:jane"]


async def test_the_openapi_document_is_served_without_a_token(gateway: Gateway) -> None:
    response = await gateway.admin.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert "/seckill/phone-1111" in document["paths"]


# ------------------------------------------------------------------ dead letters


@pytest.fixture
def failing_queue(settings_data: dict[str, Any]) -> None:
    settings_data["campaigns"][0].update(
        {"forward": "queue", "stock": 3, "max_attempts": 1, "retry_backoff": "50ms"}
    )


async def _dead_letter_two(gateway: Gateway, shop: Shop, redis: Redis) -> list[dict[str, Any]]:
    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="down")

    shop.respond = broken
    for user in ("alice", "bob"):
        assert (await gateway.buy(user, key=f"{user}-1")).status == 202

    async def two() -> bool:
        return int(await redis.xlen(f"{BASE}:dead")) == 2

    await wait_for(two, within=10.0)
    response = await gateway.admin.get("/campaigns/phone-1111/dead-letters", headers=AUTH)
    assert response.status == 200
    letters: list[dict[str, Any]] = (await response.json())["dead_letters"]
    return letters


@pytest.mark.usefixtures("failing_queue")
async def test_dead_letters_are_listed_and_replayed_taking_the_stock_again(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    letters = await _dead_letter_two(gateway, shop, redis)
    assert [letter["attempts"] for letter in letters] == [1, 1]
    assert all(letter["order"]["path"] == "/seckill/phone-1111" for letter in letters)
    assert "dead-lettered after 1 failed" in letters[0]["reason"]
    assert (await check_invariant(redis, "phone-1111", 1))["available"] == 3

    shop.respond = accept
    shop.seen.clear()
    ids = [letter["id"] for letter in letters]
    response = await gateway.admin.post(
        "/campaigns/phone-1111/dead-letters/replay", json={"ids": ids}, headers=AUTH
    )
    assert response.status == 200
    assert await response.json() == {"campaign": "phone-1111", "replayed": ids, "refused": []}

    async def delivered() -> bool:
        return int(await redis.hget(f"{BASE}:state", "sold") or 0) == 2

    await wait_for(delivered, within=10.0)
    await check_invariant(redis, "phone-1111", 1)
    assert sorted(shop.reservation_ids()) == sorted(x["reservation_id"] for x in letters)
    assert int(await redis.xlen(f"{BASE}:dead")) == 0
    assert [e["op"] for e in await ledger(redis, "phone-1111")].count("replay") == 2
    # the replayed purchase is the buyer's: a retry with its key replays its answer
    retry = await gateway.buy("alice", key="alice-1")
    assert (retry.status, (await retry.json())["state"]) == (202, "committed")
    assert retry.headers["Idempotent-Replayed"] == "true"


@pytest.mark.usefixtures("failing_queue")
async def test_a_replay_that_cannot_take_the_stock_says_why_and_changes_nothing(
    gateway: Gateway, shop: Shop, redis: Redis
) -> None:
    letters = await _dead_letter_two(gateway, shop, redis)
    shop.respond = accept
    # meanwhile alice bought again (her quota is 1) and the rest sold out
    assert (await gateway.buy("alice", key="alice-2")).status == 202
    response = await gateway.admin.post(
        "/campaigns/phone-1111/stock", json={"set": 0}, headers=AUTH
    )
    assert response.status == 200

    async def delivered() -> bool:
        return int(await redis.hget(f"{BASE}:state", "sold") or 0) == 1

    await wait_for(delivered, within=10.0)
    before = await check_invariant(redis, "phone-1111", 1)
    response = await gateway.admin.post(
        "/campaigns/phone-1111/dead-letters/replay", json={}, headers=AUTH
    )
    document = await response.json()
    assert document["replayed"] == []
    reasons = sorted(r["reason"] for r in document["refused"])
    assert reasons == ["0 left, 1 needed", "0 left, 1 needed"]
    assert await check_invariant(redis, "phone-1111", 1) == before
    assert int(await redis.xlen(f"{BASE}:dead")) == 2
    # with stock back, alice's is still refused: she holds her limit
    await gateway.admin.post("/campaigns/phone-1111/stock", json={"delta": 2}, headers=AUTH)
    response = await gateway.admin.post(
        "/campaigns/phone-1111/dead-letters/replay",
        json={"ids": [letter["id"] for letter in letters]},
        headers=AUTH,
    )
    document = await response.json()
    assert len(document["replayed"]) == 1
    assert [r["reason"] for r in document["refused"]] == ["the user holds 1 of at most 1"]


async def test_replay_names_what_it_does_not_know(
    gateway: Gateway, new_gateway: OpenGateway
) -> None:
    response = await gateway.admin.post(
        "/campaigns/phone-1111/dead-letters/replay", json={"ids": ["1-0"]}, headers=AUTH
    )
    assert (await response.json())["refused"] == [{"id": "1-0", "reason": "no such dead letter"}]
    for body in ({"ids": "1-0"}, {"ids": ["x"]}):
        response = await gateway.admin.post(
            "/campaigns/phone-1111/dead-letters/replay", json=body, headers=AUTH
        )
        assert (await problem_of(response))["code"] == "bad-request"
    response = await gateway.admin.get("/campaigns/nope/dead-letters", headers=AUTH)
    assert response.status == 404


@pytest.fixture
def retrying_queue(settings_data: dict[str, Any]) -> None:
    settings_data["campaigns"][0].update(
        {"forward": "queue", "max_attempts": 3, "retry_backoff": "50ms"}
    )


@pytest.mark.usefixtures("retrying_queue")
async def test_each_delivery_says_its_number(gateway: Gateway, shop: Shop, redis: Redis) -> None:
    failures = [1]

    async def once_broken(request: web.Request) -> web.StreamResponse:
        if failures:
            failures.pop()
            return web.Response(status=503)
        return await accept(request)

    shop.respond = once_broken
    assert (await gateway.buy("alice")).status == 202

    async def sold() -> bool:
        return int(await redis.hget(f"{BASE}:state", "sold") or 0) == 1

    await wait_for(sold, within=10.0)
    assert [s.headers["X-Delivery-Attempt"] for s in shop.seen] == ["1", "2"]
    # a client's own copy never reaches the backend
    assert (await gateway.buy("bob", headers={"X-Delivery-Attempt": "7"})).status == 202

    async def two() -> bool:
        return int(await redis.hget(f"{BASE}:state", "sold") or 0) == 2

    await wait_for(two, within=10.0)
    assert shop.seen[-1].headers["X-Delivery-Attempt"] == "1"
