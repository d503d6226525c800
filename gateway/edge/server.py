"""The edge: the buyer-facing HTTP server.

aiohttp's low-level server with one handler that routes by a dict lookup on the
path: the hot path pays no Application, no router regexes and no middleware
(the bench measured about a quarter more requests per second than an aiohttp
Application for the same answer), and every refusal is problem+json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.admission.clientip import client_ip
from gateway.admission.room import QUEUE_PASS_HEADER
from gateway.core.carts import Cart
from gateway.core.health import Handler, health_handlers
from gateway.core.snapshot import Snapshot
from gateway.edge.answers import Answer
from gateway.edge.cart import buy_cart
from gateway.edge.connections import GuardedServer, connection_budget
from gateway.edge.context import Edge
from gateway.edge.cors import CorsPolicy, cross_origin
from gateway.edge.purchase import purchase
from gateway.edge.queue import queue_request
from gateway.edge.reservations import PREFIX as RESERVATIONS
from gateway.edge.reservations import reservation_status
from gateway.problems import Code, Problem, name_the_server, problem
from limiter.logs import Throttled

log = logging.getLogger(__name__)
#: A bug that fails every request must not also flood the log.
_failures = Throttled(log)


def create_server(edge: Edge) -> web.Server:
    """The edge server; the body limit (gateway.max_body_bytes, reloadable) is enforced
    while reading, and no access log is kept here (the access log does that). Slow and
    greedy connections are dealt with around it (see connections.py)."""
    name_the_server()
    settings = edge.live.current.settings
    budget: list[Any] = [None, 0]  # the settings it was computed for, and the budget

    def connections() -> int:
        current = edge.live.current.settings
        if budget[0] is not current:
            budget[:] = [current, connection_budget(current)]
        return int(budget[1])

    return GuardedServer(
        edge_handler(edge),
        edge.live,
        connections,
        access_log=None,
        keepalive_timeout=settings.gateway.keepalive_timeout,
    )


def edge_handler(edge: Edge) -> Handler:
    route = _routes(edge)
    policies: dict[int, tuple[object, CorsPolicy]] = {}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        snapshot = edge.live.current  # this request's, to its end
        cors = snapshot.settings.gateway.cors
        if cors is None:
            return await route(request, snapshot)
        known = policies.get(id(snapshot))
        if known is None or known[0] is not snapshot:
            policies.clear()
            known = policies[id(snapshot)] = (snapshot, _policy(snapshot))
        methods = _cors_methods(snapshot, request.path)
        return await cross_origin(known[1], request, methods, lambda: route(request, snapshot))

    return handle


def _policy(snapshot: Snapshot) -> CorsPolicy:
    identity = snapshot.settings.identity
    headers = ("Authorization",) if identity.jwt is not None else (identity.header,)
    cors = snapshot.settings.gateway.cors
    assert cors is not None
    return CorsPolicy(cors, (*headers, QUEUE_PASS_HEADER))


def _cors_methods(snapshot: Snapshot, path: str) -> tuple[str, ...] | None:
    """What a browser may do at ``path``: a campaign route's method, GET on a buyer's
    reservation, a waiting room's calls; None elsewhere (no CORS for the health checks)."""
    methods = snapshot.routes.get(path)
    if methods is not None:
        return tuple(methods)
    queue = snapshot.queues.get(path)
    if queue is not None:
        return ("GET", "HEAD", "POST") if queue[1] == "queue" else ("GET", "HEAD")
    if path.startswith(RESERVATIONS):
        return ("GET", "HEAD")
    return None


Route = Callable[[web.BaseRequest, Snapshot], Awaitable[web.StreamResponse]]


def _routes(edge: Edge) -> Route:
    own = health_handlers(edge.readiness)
    count = edge.counts.request
    timed = edge.counts.duration
    access = edge.access

    async def route(request: web.BaseRequest, snapshot: Snapshot) -> web.StreamResponse:
        methods = snapshot.routes.get(request.path)
        if methods is None:
            queue = snapshot.queues.get(request.path)
            if queue is not None:
                return await queue_request(snapshot, *queue, request)
            handler = own.get(request.path)
            if handler is None and request.path.startswith(RESERVATIONS):
                return await _guarded(
                    lambda r: reservation_status(snapshot, r), request, ("GET", "HEAD")
                )
            if handler is None:
                return problem(Code.NOT_FOUND, f"no campaign at {request.path}")
            return await _guarded(handler, request, ("GET", "HEAD"))
        campaign = methods.get(request.method)
        if campaign is None:
            return _method_not_allowed(request, tuple(methods))
        started = time.perf_counter()
        try:
            if isinstance(campaign, Cart):
                answer = await buy_cart(edge, snapshot, campaign, request)
            else:
                answer = await purchase(edge, snapshot, campaign, request)
        except Exception:
            _failures.log(
                logging.ERROR, request.path, "purchase at %s failed", request.path, exc_info=True
            )
            failed = problem(Code.INTERNAL, "the gateway failed; the log has the details")
            answer = Answer(Code.INTERNAL.value, failed)
        count(campaign.id, answer.code)
        if not answer.local:  # answers from memory are counted, not timed
            timed(campaign.id, answer.code, time.perf_counter() - started)
        if access.wants(answer.local):
            access.record(
                campaign=campaign.id,
                user=answer.user,
                code=answer.code,
                status=answer.response.status,
                seconds=time.perf_counter() - started,
                reservation_id=answer.response.headers.get("X-Reservation-Id", ""),
                client=client_ip(request, snapshot.settings.gateway.trusted_proxies),
            )
        return answer.response

    return route


async def _guarded(
    handler: Handler, request: web.BaseRequest, allowed: tuple[str, ...]
) -> web.StreamResponse:
    if request.method not in allowed:
        return _method_not_allowed(request, allowed)
    return await handler(request)


def _method_not_allowed(request: web.BaseRequest, allowed: tuple[str, ...]) -> web.Response:
    return Problem(
        Code.METHOD_NOT_ALLOWED,
        f"{request.method} is not allowed at {request.path}; use {', '.join(allowed)}",
        headers={"Allow": ", ".join(allowed)},
    ).response()
