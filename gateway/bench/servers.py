"""The reference servers ``flashgate bench`` measures flashgate against, each run as
its own process: ``python -m gateway.bench.servers KIND --port N ...``.

* ``deduct-only``: the seeds' naive design: one aiohttp handler, one EVALSHA per
  request of a script that checks one stock counter and decrements it. No
  reservation record, no idempotency, no forwarding: the least a Redis-backed sale
  can do per request, so flashgate's ratio against it is what its batching and its
  local sold-out answers buy.
* ``naive``: the same design doing flashgate's job plainly: one EVALSHA of the same
  reserve.lua per request (Idempotency-Key included), no local sold-out flag, no
  batching, no pipelining; a winner is forwarded to the backend and committed with
  commit.lua.
* ``hello``: an ordinary aiohttp ``Application`` with one route, as most aiohttp
  services are written.
* ``fixed-409``: aiohttp's low-level ``web.Server`` answering every request with
  the bytes flashgate answers a sold-out request with: the ceiling of any aiohttp
  answer, so flashgate's sold-out path is measured against the floor of its own
  server rather than against an Application's router.
* ``backend``: the stub order backend, recording what reached it
  (``GET /_orders``).

The Redis servers' pools are BlockingConnectionPools of 256: with redis-py's
default asyncio pool the crowd gets "Too many connections" errors
(MaxConnectionsError) instead of answers, which would make a baseline look broken
rather than slow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientSession, web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript

from gateway.bench.backend import StubBackend
from gateway.edge.buyer import IDEMPOTENCY_HEADER, parse_key
from gateway.problems import CannedProblem, Code, Problem, name_the_server
from limiter.keys import CampaignKeys, idempotency_field, new_reservation_id
from limiter.scripts import script

PROBLEM = "application/problem+json"
#: As flashgate's own sites (gateway/process/serve.py).
BACKLOG = 4096
KINDS = ("naive", "deduct-only", "hello", "fixed-409", "backend")

#: The deduct-only design's whole decision.
#: KEYS[1] stock counter   ARGV[1] units asked
#: returns the units left after taking them, or -1 when fewer are left (nothing taken)
DEDUCT = """
local asked = tonumber(ARGV[1])
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
if left < asked then
  return -1
end
return redis.call('DECRBY', KEYS[1], asked)
"""


def stock_key(campaign: str) -> str:
    """The deduct-only counter, under the campaign's hash tag: on a cluster it lives
    on the node that holds the campaign's keys."""
    return f"{CampaignKeys(campaign).base}:stock"


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def fixed_409_server(campaign: str) -> web.Server:
    """Every request answered as flashgate answers a sold-out one (same status, body
    and headers), by a handler that does nothing else."""
    name_the_server()
    sold_out = CannedProblem(
        Problem(Code.SOLD_OUT, f"campaign {campaign} is sold out", campaign=campaign)
    )

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        return sold_out.response()

    return web.Server(answer, access_log=None)


def _redis(url: str) -> Redis:
    return Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=256))


async def _order(request: web.Request) -> tuple[str, int, bytes] | web.Response:
    """The buyer and the units asked, or the refusal of a request without a buyer."""
    user = request.headers.get("X-User-Id", "")
    if not user:
        return _problem(401, "unauthenticated")
    body = await request.read()
    quantity = int(json.loads(body).get("quantity", 1)) if body else 1
    return user, quantity, body


def deduct_only_app(redis_url: str, campaign: str) -> web.Application:
    key = stock_key(campaign)
    scripts: dict[str, AsyncScript] = {}

    async def setup(app: web.Application) -> AsyncIterator[None]:
        redis = _redis(redis_url)
        scripts["deduct"] = redis.register_script(DEDUCT)
        yield
        await redis.aclose()

    async def buy(request: web.Request) -> web.Response:
        order = await _order(request)
        if isinstance(order, web.Response):
            return order
        _, quantity, _ = order
        left = int(await scripts["deduct"](keys=[key], args=[quantity]))
        if left < 0:
            return _problem(409, "sold-out")
        return web.json_response({"sold": quantity}, status=201)

    return _app(setup, buy)


def _app(
    setup: Callable[[web.Application], AsyncIterator[None]],
    buy: Callable[[web.Request], Awaitable[web.Response]],
) -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(setup)
    app.router.add_route("POST", "/{tail:.*}", buy)
    return app


class _Naive:
    """The naive design's calls of flashgate's own scripts, one EVALSHA each."""

    def __init__(self, redis: Redis, campaign: str, per_user_limit: int) -> None:
        self.keys = keys = CampaignKeys(campaign)
        self.limit = per_user_limit
        self._reserve = redis.register_script(script("reserve").text)
        self._commit = redis.register_script(script("commit").text)
        self._reserve_keys = [
            keys.state,
            keys.users,
            keys.idempotency,
            keys.ledger,
            keys.index,
            keys.deadlines,
        ]

    async def reserve(self, rid: str, user: str, quantity: int, field: str) -> int:
        """reserve.lua for one attempt (no deadline, no kept order, no fingerprint); its
        status."""
        attempt = (rid, user, quantity, field, b"", "")
        reply = await self._reserve(
            keys=[*self._reserve_keys, self.keys.reservation(rid)],
            args=[self.limit, 0, 100_000, "sync", self.keys.events, *attempt],
        )
        return int(reply[0])

    async def commit(self, rid: str) -> None:
        """commit.lua for one sale the backend accepted."""
        k = self.keys
        item = (rid, "committed", 0, "", "reserved", "", "", b"", "")
        await self._commit(
            keys=[k.state, k.users, k.ledger, k.deadlines, k.idempotency, k.reservation(rid)],
            args=[self.limit, "naive", 100_000, k.events, *item],
        )


def naive_app(redis_url: str, upstream: str, campaign: str, per_user_limit: int) -> web.Application:
    parts: dict[str, object] = {}

    async def setup(app: web.Application) -> AsyncIterator[None]:
        redis = _redis(redis_url)
        parts["naive"] = _Naive(redis, campaign, per_user_limit)
        parts["session"] = session = ClientSession()
        yield
        await session.close()
        await redis.aclose()

    async def buy(request: web.Request) -> web.Response:
        naive: _Naive = parts["naive"]  # type: ignore[assignment]
        session: ClientSession = parts["session"]  # type: ignore[assignment]
        order = await _order(request)
        if isinstance(order, web.Response):
            return order
        user, quantity, body = order
        key = parse_key(request.headers.get(IDEMPOTENCY_HEADER, "")) or ""
        rid = new_reservation_id(campaign)
        field = idempotency_field(user, key) if key else ""
        status = await naive.reserve(rid, user, quantity, field)
        if status != 0:
            return _problem(409 if status in (1, 2, 3) else 403, _CODES.get(status, "refused"))
        headers = {
            "X-Reservation-Id": rid,
            "X-User-Id": user,
            "X-Quantity": str(quantity),
            "X-Campaign-Id": campaign,
        }
        async with session.post(upstream + request.path, data=body, headers=headers) as answer:
            payload = await answer.read()
        await naive.commit(rid)
        return web.Response(status=answer.status, body=payload, headers={"X-Reservation-Id": rid})

    return _app(setup, buy)


_CODES = {
    1: "duplicate",
    2: "sold-out",
    3: "insufficient-stock",
    4: "limit-exceeded",
    5: "unavailable",
}


def _problem(status: int, code: str) -> web.Response:
    body = json.dumps(
        {
            "type": f"urn:flashgate:problem:{code}",
            "title": code,
            "status": status,
            "detail": code,
            "code": code,
        },
        separators=(",", ":"),  # as flashgate writes it: the crowd reads the code
    )
    return web.Response(status=status, text=body, content_type=PROBLEM)


def server_for(args: argparse.Namespace) -> web.Application | web.Server:
    if args.kind == "naive":
        return naive_app(args.redis, args.upstream, args.campaign, args.per_user_limit)
    if args.kind == "deduct-only":
        return deduct_only_app(args.redis, args.campaign)
    if args.kind == "hello":
        return hello_app()
    if args.kind == "fixed-409":
        return fixed_409_server(args.campaign)
    return StubBackend().app()


async def serve(args: argparse.Namespace) -> None:
    """Serve until killed (the bench stops its servers with SIGTERM), on a site made as
    flashgate makes its own (the same backlog), so that only the handlers differ."""
    server = server_for(args)  # web.Server needs the running loop
    runner: web.BaseRunner
    if isinstance(server, web.Application):
        runner = web.AppRunner(server, access_log=None)
    else:
        runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=BACKLOG).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.servers")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="")
    parser.add_argument("--upstream", default="")
    parser.add_argument("--campaign", default="bench")
    parser.add_argument("--per-user-limit", type=int, default=1)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
