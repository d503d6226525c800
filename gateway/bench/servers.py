"""The reference servers ``flashgate bench`` measures flashgate against, each run as
its own process: ``python -m gateway.bench.servers {naive,hello,backend} ...``.

* ``naive``: the seeds' design done plainly: one aiohttp handler, one EVALSHA of
  the same reserve.lua per request, no local sold-out flag, no batching, no
  pipelining; a winner is forwarded to the backend and committed. Its pool is a
  BlockingConnectionPool of 256: with redis-py's default asyncio pool the crowd
  gets "Too many connections" errors (MaxConnectionsError) instead of answers,
  which would make the baseline look broken rather than slow.
* ``hello``: a bare aiohttp + uvloop handler, the ceiling of any aiohttp server.
* ``backend``: the stub order backend, recording what reached it
  (``GET /_orders``).
"""

from __future__ import annotations

import argparse
import json

from aiohttp import ClientSession, web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript

from gateway.bench.backend import StubBackend
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.scripts import script

PROBLEM = "application/problem+json"


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def naive_app(redis_url: str, upstream: str, campaign: str, per_user_limit: int) -> web.Application:
    keys = CampaignKeys(campaign)
    reserve_keys = [
        keys.state,
        keys.users,
        keys.idempotency,
        keys.ledger,
        keys.index,
        keys.deadlines,
    ]
    app = web.Application()
    state: dict[str, object] = {}

    async def setup(app: web.Application):  # type: ignore[no-untyped-def]
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=256)
        )
        # the naive design calls its scripts through redis-py, one EVALSHA each
        state["redis"], state["scripts"] = (
            redis,
            {name: redis.register_script(script(name).text) for name in ("reserve", "commit")},
        )
        state["session"] = ClientSession()
        yield
        await state["session"].close()  # type: ignore[attr-defined]
        await redis.aclose()

    async def buy(request: web.Request) -> web.Response:
        scripts: dict[str, AsyncScript] = state["scripts"]  # type: ignore[assignment]
        user = request.headers.get("X-User-Id", "")
        if not user:
            return _problem(401, "unauthenticated")
        body = await request.read()
        quantity = json.loads(body).get("quantity", 1) if body else 1
        rid = new_reservation_id(campaign)
        reply = await scripts["reserve"](
            keys=[*reserve_keys, keys.reservation(rid)],
            args=[per_user_limit, 0, 100_000, "sync", keys.events, rid, user, quantity, "", b""],
        )
        status = int(reply[0])
        if status != 0:
            return _problem(409 if status in (2, 3) else 403, _CODES.get(status, "refused"))
        headers = {
            "X-Reservation-Id": rid,
            "X-User-Id": user,
            "X-Quantity": str(quantity),
            "X-Campaign-Id": campaign,
        }
        session: ClientSession = state["session"]  # type: ignore[assignment]
        async with session.post(upstream + request.path, data=body, headers=headers) as answer:
            payload = await answer.read()
        await scripts["commit"](
            keys=[keys.state, keys.users, keys.ledger, keys.deadlines, keys.reservation(rid)],
            args=[
                rid,
                "committed",
                0,
                "",
                per_user_limit,
                "",
                "",
                b"",
                "naive",
                100_000,
                keys.events,
                "reserved",
            ],
        )
        return web.Response(status=answer.status, body=payload, headers={"X-Reservation-Id": rid})

    app.cleanup_ctx.append(setup)
    app.router.add_route("POST", "/{tail:.*}", buy)
    return app


_CODES = {2: "sold-out", 3: "insufficient-stock", 4: "limit-exceeded", 5: "unavailable"}


def _problem(status: int, code: str) -> web.Response:
    body = json.dumps(
        {
            "type": f"urn:flashgate:problem:{code}",
            "title": code,
            "status": status,
            "detail": code,
            "code": code,
        }
    )
    return web.Response(status=status, text=body, content_type=PROBLEM)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.servers")
    parser.add_argument("kind", choices=["naive", "hello", "backend"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="")
    parser.add_argument("--upstream", default="")
    parser.add_argument("--campaign", default="bench")
    parser.add_argument("--per-user-limit", type=int, default=1)
    args = parser.parse_args()
    import uvloop

    if args.kind == "naive":
        app = naive_app(args.redis, args.upstream, args.campaign, args.per_user_limit)
    elif args.kind == "hello":
        app = hello_app()
    else:
        app = StubBackend().app()
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
