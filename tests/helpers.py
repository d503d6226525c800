"""Test helpers: a recording order backend, gateways in-process, an invariant check
that reads Redis directly (independent of the code under test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from aiohttp import ClientResponse, web
from aiohttp.test_utils import RawTestServer, TestClient, TestServer
from redis.asyncio import Redis, RedisCluster

from gateway.config import Settings, parse_settings
from gateway.core.runtime import Runtime
from gateway.edge.server import edge_handler
from gateway.operations.admin import create_admin_app
from gateway.process.serve import admin_parts, edge_parts
from limiter.guard import RedisGuard
from limiter.pipeline import AutoPipeline

ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def accept(request: web.Request) -> web.StreamResponse:
    """The default backend answer: 201 with an order document."""
    return web.json_response(
        {"order_id": f"order-{request.headers.get('X-Reservation-Id')}"},
        status=201,
        headers={"X-Shop": "yes"},
    )


@dataclass
class Shop:
    """An order backend that records every request it receives."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    respond: Responder = accept
    in_flight: int = 0
    max_in_flight: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.respond(request)
        finally:
            self.in_flight -= 1

    def reservation_ids(self) -> list[str]:
        return [s.headers["X-Reservation-Id"] for s in self.seen]


def settings_for(data: dict[str, Any]) -> Settings:
    return parse_settings(yaml.safe_dump(data), "test.yaml", environ={})


@dataclass
class Gateway:
    runtime: Runtime
    edge: TestClient[web.BaseRequest, None]
    admin: TestClient[web.Request, web.Application]

    async def buy(
        self,
        user: str | None = "alice",
        *,
        quantity: int | None = None,
        key: str | None = None,
        path: str = "/seckill/phone-1111",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> ClientResponse:
        sent = dict(headers or {})
        if user is not None:
            sent["X-User-Id"] = user
        if key is not None:
            sent["Idempotency-Key"] = key
        if quantity is not None:
            kwargs.setdefault("json", {"quantity": quantity})
        return await self.edge.post(path, headers=sent, **kwargs)

    async def campaign(self, campaign_id: str = "phone-1111") -> dict[str, Any]:
        response = await self.admin.get(f"/campaigns/{campaign_id}", headers=AUTH)
        assert response.status == 200, await response.text()
        document: dict[str, Any] = await response.json()
        return document


@contextlib.asynccontextmanager
async def open_gateway(
    settings: Settings,
    redis_url: str,
    *,
    config_path: str | None = None,
    respawned: bool = False,
) -> AsyncIterator[Gateway]:
    async with Runtime.open(
        settings, redis_url, config_path=config_path, respawned=respawned
    ) as runtime:
        edge: TestClient[web.BaseRequest, None] = TestClient(
            RawTestServer(edge_handler(edge_parts(runtime)), host="127.0.0.1")
        )
        admin = TestClient(TestServer(create_admin_app(admin_parts(runtime)), host="127.0.0.1"))
        await edge.start_server()
        await admin.start_server()
        try:
            yield Gateway(runtime, edge, admin)
        finally:
            await edge.close()
            await admin.close()


#: What the ``new_gateway`` fixture (and test_operations' ``reloadable``) hand a test:
#: ``async with new_gateway() as gw`` opens a gateway on the settings as they are then.
OpenGateway = Callable[[], contextlib.AbstractAsyncContextManager[Gateway]]


async def problem_of(response: ClientResponse) -> dict[str, Any]:
    """The problem document of a refusal, checked for RFC 9457 shape."""
    assert response.content_type == "application/problem+json", await response.text()
    document: dict[str, Any] = json.loads(await response.read())
    assert {"type", "title", "status", "detail", "code"} <= document.keys()
    assert document["status"] == response.status
    return document


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def as_text(mapping: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in mapping.items()}


async def ledger(redis: Redis, campaign_id: str) -> list[dict[str, str]]:
    """The campaign's ledger entries, oldest first."""
    entries = await redis.xrange(f"fg:{{{campaign_id}}}:ledger") or []
    return [as_text(fields or {}) for _, fields in entries]


async def check_invariant(
    redis: Redis | RedisCluster, campaign_id: str, per_user_limit: int, prefix: str = "fg"
) -> dict[str, int]:
    """stock_total == available + reserved + sold; the reservation records and the
    users' quotas agree with the counters; nobody above the limit. Returns the counters.
    (``campaign_id``: a shard's tag for a shard of a sharded campaign.)"""
    base = f"{prefix}:{{{campaign_id}}}"
    raw = as_text(await redis.hgetall(f"{base}:state"))
    state = {k: int(v) for k, v in raw.items() if k != "created_ms"}
    assert state["stock_total"] == state["available"] + state["reserved"] + state["sold"], state
    assert min(state.values()) >= 0, state
    held_by_state = {"reserved": 0, "held": 0, "committed": 0}
    held_by_user: dict[str, int] = {}
    async for key in redis.scan_iter(match=f"{base}:r:*", count=1000):
        # only these fields: a stored backend reply may be binary
        fields = await redis.hmget(key, "state", "user", "qty")
        status, user, qty = (text(v or b"") for v in fields)
        if status in held_by_state:
            held_by_state[status] += int(qty)
            held_by_user[user] = held_by_user.get(user, 0) + int(qty)
    assert held_by_state["reserved"] + held_by_state["held"] == state["reserved"], (
        held_by_state,
        state,
    )
    assert held_by_state["committed"] == state["sold"], (held_by_state, state)
    quotas = {k: int(v) for k, v in as_text(await redis.hgetall(f"{base}:users")).items()}
    assert quotas == held_by_user, "users' quotas disagree with their reservations"
    assert all(units <= per_user_limit for units in quotas.values()), "someone is above the limit"
    return state


async def order_ids(redis: Redis, cart: str = "bundle") -> list[str]:
    """Every order of a cart, oldest first (its index)."""
    raw = cast(list[bytes], await redis.zrange(f"fg:{{{cart}}}:rids", 0, -1))
    return [r.decode() for r in raw]


async def wait_for(condition: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> float:
    """Poll ``condition`` until true; returns the seconds it took (fails after ``within``)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await _truth(condition()):
        if loop.time() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
    return loop.time() - start


async def _truth(value: Awaitable[bool] | bool) -> bool:
    return value if isinstance(value, bool) else await value


def wait_for_sync(condition: Callable[[], bool], within: float = 5.0) -> float:
    """``wait_for`` for tests without an event loop: poll ``condition`` until true; returns
    the seconds it took (fails after ``within``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        time.sleep(0.01)
    return time.monotonic() - start


async def redis_snapshot(redis: Redis) -> dict[Any, Any]:
    """Every key and its content, to show that a request changed nothing (the live
    processes' heartbeat, which ticks on its own, aside)."""
    snapshot: dict[Any, Any] = {}
    async for key in redis.scan_iter(count=1000):
        if key == b"fg:gateways":
            continue
        kind = text(await redis.type(key))
        if kind == "hash":
            snapshot[key] = await redis.hgetall(key)
        elif kind == "zset":
            snapshot[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            snapshot[key] = await redis.xrange(key)
        elif kind == "set":
            snapshot[key] = await redis.smembers(key)
        else:
            snapshot[key] = await redis.dump(key)
    return snapshot


async def raw_status(client: TestClient[Any, Any], head: bytes) -> int:
    """Send a request's head byte for byte (bytes no HTTP client library would send)
    and return the answer's status."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate (with its key) signed by it."""

    ca: Path
    cert: Path
    key: Path


@contextlib.asynccontextmanager
async def auto_pipeline(url: str, deadline: float) -> AsyncIterator[AutoPipeline]:
    """An auto-pipeline to the Redis at ``url`` with a ``deadline`` s guard, closed after."""
    guard = RedisGuard(deadline)
    try:
        async with AutoPipeline.opened(url, guard) as pipe:
            yield pipe
    finally:
        guard.close()
