"""Bad input gets its own 4xx problem and changes nothing in Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from tests.helpers import (
    Gateway,
    Shop,
    open_gateway,
    problem_of,
    raw_status,
    redis_snapshot,
    settings_for,
)

pytestmark = pytest.mark.integration

USER = {"X-User-Id": "alice"}
PATH = "/seckill/phone-1111"

# (name, method, path, headers, body, status, code)
EDGE_CASES: list[tuple[str, str, str, dict[str, str], bytes | None, int, str]] = [
    ("broken JSON", "POST", PATH, USER, b'{"quantity": ', 400, "bad-request"),
    ("not an object", "POST", PATH, USER, b"[1]", 400, "bad-request"),
    ("not UTF-8", "POST", PATH, USER, b'{"quantity": "\xff"}', 400, "bad-request"),
    ("quantity a string", "POST", PATH, USER, b'{"quantity": "1"}', 400, "bad-request"),
    ("quantity a float", "POST", PATH, USER, b'{"quantity": 1.5}', 400, "bad-request"),
    ("quantity 1.0", "POST", PATH, USER, b'{"quantity": 1.0}', 400, "bad-request"),
    ("quantity true", "POST", PATH, USER, b'{"quantity": true}', 400, "bad-request"),
    ("quantity null", "POST", PATH, USER, b'{"quantity": null}', 400, "bad-request"),
    ("quantity zero", "POST", PATH, USER, b'{"quantity": 0}', 400, "bad-request"),
    ("quantity negative", "POST", PATH, USER, b'{"quantity": -1}', 400, "bad-request"),
    ("quantity too large", "POST", PATH, USER, b'{"quantity": 2}', 400, "bad-request"),
    ("quantity huge", "POST", PATH, USER, b'{"quantity": 1e400}', 400, "bad-request"),
    ("body too large", "POST", PATH, USER, b'{"pad": "' + b"x" * 70_000 + b'"}', 413, "too-large"),
    ("JSON nested too deep", "POST", PATH, USER, b"[" * 60_000, 400, "bad-request"),
    (
        "gzip that is not",
        "POST",
        PATH,
        {**USER, "Content-Encoding": "gzip"},
        b'{"quantity": 1}',
        400,
        "bad-request",
    ),
    ("no identity", "POST", PATH, {}, b"", 401, "unauthenticated"),
    ("empty identity", "POST", PATH, {"X-User-Id": "  "}, b"", 401, "unauthenticated"),
    ("identity too long", "POST", PATH, {"X-User-Id": "u" * 300}, b"", 401, "unauthenticated"),
    (
        "empty Idempotency-Key",
        "POST",
        PATH,
        {**USER, "Idempotency-Key": ""},
        b"",
        400,
        "bad-request",
    ),
    (
        "long Idempotency-Key",
        "POST",
        PATH,
        {**USER, "Idempotency-Key": "k" * 129},
        b"",
        400,
        "bad-request",
    ),
    (
        "non-ASCII Idempotency-Key",
        "POST",
        PATH,
        {**USER, "Idempotency-Key": "clé"},
        b"",
        400,
        "bad-request",
    ),
    ("wrong method", "GET", PATH, USER, None, 405, "method-not-allowed"),
    ("wrong method PUT", "PUT", PATH, USER, b"", 405, "method-not-allowed"),
    ("no route", "POST", "/seckill/unknown", USER, b"", 404, "not-found"),
    ("trailing slash", "POST", PATH + "/", USER, b"", 404, "not-found"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [case[1:] for case in EDGE_CASES],
    ids=[case[0] for case in EDGE_CASES],
)
async def test_edge_refuses_bad_input_and_changes_nothing(
    gateway: Gateway,
    shop: Shop,
    redis: Redis,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    status: int,
    code: str,
) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.edge.request(method, path, headers=headers, data=body)
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (status, code), problem
    assert problem["detail"]
    assert await redis_snapshot(redis) == before
    assert shop.seen == []


async def test_two_idempotency_keys_are_refused(gateway: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.edge.post(
        PATH, headers=[("X-User-Id", "alice"), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    )
    assert (response.status, (await problem_of(response))["code"]) == (400, "bad-request")
    assert await redis_snapshot(redis) == before


async def test_two_identity_headers_are_refused(gateway: Gateway, redis: Redis) -> None:
    # a proxy that adds its X-User-Id instead of replacing the client's
    before = await redis_snapshot(redis)
    response = await gateway.edge.post(
        PATH, headers=[("X-User-Id", "victim"), ("X-User-Id", "proxy-says")]
    )
    assert (response.status, (await problem_of(response))["code"]) == (401, "unauthenticated")
    assert await redis_snapshot(redis) == before


async def test_a_body_that_does_not_arrive_in_time_is_refused(
    settings_data: dict[str, Any], redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings_data["gateway"]["body_timeout"] = "300ms"
    async with open_gateway(settings_for(settings_data), redis_server.url) as gateway:
        before = await redis_snapshot(redis)
        server = gateway.edge.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\n"
            writer.write(head.encode() + b"Content-Length: 10\r\n\r\n{")  # and then nothing
            await writer.drain()
            async with asyncio.timeout(5):
                status_line = await reader.readline()
        finally:
            writer.close()
            await writer.wait_closed()
        assert int(status_line.split()[1]) == 408
        assert await redis_snapshot(redis) == before


async def test_method_not_allowed_names_the_allowed_method(gateway: Gateway) -> None:
    response = await gateway.edge.get(PATH)
    assert response.headers["Allow"] == "POST"


async def test_chunked_body_over_the_limit(gateway: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)

    async def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 1024

    response = await gateway.edge.post(PATH, headers=USER, data=chunks())
    assert (response.status, (await problem_of(response))["code"]) == (413, "too-large")
    assert await redis_snapshot(redis) == before


ADMIN_CASES: list[tuple[str, str, str, dict[str, str], Any, int, str]] = [
    ("no token", "GET", "/campaigns", {}, None, 401, "unauthenticated"),
    (
        "wrong token",
        "GET",
        "/campaigns",
        {"Authorization": "Bearer nope"},
        None,
        401,
        "unauthenticated",
    ),
    (
        "token without Bearer",
        "GET",
        "/campaigns",
        {"Authorization": "test-admin-token"},
        None,
        401,
        "unauthenticated",
    ),
    (
        "basic auth",
        "GET",
        "/campaigns",
        {"Authorization": "Basic dGVzdA=="},
        None,
        401,
        "unauthenticated",
    ),
    (
        "no token on stock",
        "POST",
        "/campaigns/phone-1111/stock",
        {},
        {"delta": 5},
        401,
        "unauthenticated",
    ),
    (
        "no token on cancel",
        "POST",
        "/reservations/phone-1111.0123456789abcdef0123/cancel",
        {},
        None,
        401,
        "unauthenticated",
    ),
]
AUTH = {"Authorization": "Bearer test-admin-token"}
STOCK_CASES: list[tuple[str, Any, int, str]] = [
    ("both delta and set", {"delta": 1, "set": 2}, 400, "bad-request"),
    ("neither", {}, 400, "bad-request"),
    ("unknown field", {"delta": 1, "why": "x"}, 400, "bad-request"),
    ("delta a string", {"delta": "5"}, 400, "bad-request"),
    ("delta a float", {"delta": 1.5}, 400, "bad-request"),
    ("delta a bool", {"delta": True}, 400, "bad-request"),
    ("set negative", {"set": -1}, 409, "insufficient-stock"),
    ("not an object", [1], 400, "bad-request"),
    ("below zero", {"delta": -11}, 409, "insufficient-stock"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [case[1:] for case in ADMIN_CASES],
    ids=[case[0] for case in ADMIN_CASES],
)
async def test_admin_refuses_without_token(
    gateway: Gateway,
    redis: Redis,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    code: str,
) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.admin.request(method, path, headers=headers, json=body)
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (status, code)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis_snapshot(redis) == before


async def test_headers_that_are_not_utf8_are_refused_not_crashed_on(
    gateway: Gateway, redis: Redis
) -> None:
    before = await redis_snapshot(redis)
    bad = b"\xff\xfe\x80"
    admin = b"GET /campaigns HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + bad + b"\r\n"
    assert await raw_status(gateway.admin, admin) == 401
    buy = f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode() + b"X-User-Id: " + bad + b"\r\n"
    assert await raw_status(gateway.edge, buy) == 401
    poll = b"GET /reservations/x.y HTTP/1.1\r\nHost: x\r\nX-User-Id: " + bad + b"\r\n"
    assert await raw_status(gateway.edge, poll) == 401
    key = b"Idempotency-Key: " + bad + b"\r\n"
    assert await raw_status(gateway.edge, buy.replace(bad, b"alice") + key) == 400
    assert await redis_snapshot(redis) == before


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [case[1:] for case in STOCK_CASES],
    ids=[case[0] for case in STOCK_CASES],
)
async def test_stock_change_refuses_bad_input(
    gateway: Gateway, redis: Redis, body: Any, status: int, code: str
) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.admin.post("/campaigns/phone-1111/stock", headers=AUTH, json=body)
    problem = await problem_of(response)
    assert (response.status, problem["code"]) == (status, code), problem
    assert await redis_snapshot(redis) == before


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{delta", "application/json"),
        (b"[" * 60_000, "application/json"),
        (b'{"delta": 1}', "application/json; charset=no-such-charset"),
    ],
    ids=["broken", "nested too deep", "unknown charset"],
)
async def test_stock_change_refuses_unreadable_json(
    gateway: Gateway, redis: Redis, body: bytes, content_type: str
) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.admin.post(
        "/campaigns/phone-1111/stock",
        headers={**AUTH, "Content-Type": content_type},
        data=body,
    )
    assert (response.status, (await problem_of(response))["code"]) == (400, "bad-request")
    assert await redis_snapshot(redis) == before


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/campaigns/nope", 404, "not-found"),
        ("POST", "/campaigns/nope/stock", 404, "not-found"),
        ("GET", "/reservations/not-an-id", 404, "not-found"),
        ("GET", "/reservations/phone-1111.0123456789abcdef0123", 404, "not-found"),
        ("POST", "/reservations/nope.0123456789abcdef0123/cancel", 404, "not-found"),
        ("DELETE", "/campaigns/phone-1111", 405, "method-not-allowed"),
        ("GET", "/nothing-here", 404, "not-found"),
    ],
)
async def test_admin_unknown_things(
    gateway: Gateway, redis: Redis, method: str, path: str, status: int, code: str
) -> None:
    before = await redis_snapshot(redis)
    response = await gateway.admin.request(method, path, headers=AUTH, json={"delta": 1})
    assert (response.status, (await problem_of(response))["code"]) == (status, code)
    assert await redis_snapshot(redis) == before
