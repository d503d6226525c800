"""The edge: the buyer-facing aiohttp application.

One catch-all handler routes by a dict lookup on the path, so the hot path pays
no middleware and no router regexes, and every refusal is problem+json.
"""

from __future__ import annotations

import logging
from functools import partial

from aiohttp import web

from gateway.health import Handler, health_handlers
from gateway.problems import Code, Problem, problem
from gateway.purchase import purchase
from gateway.runtime import Runtime
from gateway.status import PREFIX as STATUS_PREFIX
from gateway.status import reservation_status

log = logging.getLogger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=runtime.max_body)
    app[RUNTIME] = runtime
    own = health_handlers(runtime)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        methods = runtime.registry.routes.get(request.path)
        if methods is None:
            handler = own.get(request.path)
            if handler is None and request.path.startswith(STATUS_PREFIX):
                handler = partial(reservation_status, runtime)
            if handler is None:
                return problem(Code.NOT_FOUND, f"no campaign at {request.path}")
            return await _guarded(handler, request, allowed=("GET", "HEAD"))
        campaign = methods.get(request.method)
        if campaign is None:
            return _method_not_allowed(request, tuple(methods))
        try:
            return await purchase(runtime, campaign, request)
        except Exception:
            log.exception("purchase at %s failed", request.path)
            return problem(Code.INTERNAL, "the gateway failed; the log has the details")

    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def _guarded(
    handler: Handler, request: web.Request, allowed: tuple[str, ...]
) -> web.StreamResponse:
    if request.method not in allowed:
        return _method_not_allowed(request, allowed)
    return await handler(request)


def _method_not_allowed(request: web.Request, allowed: tuple[str, ...]) -> web.Response:
    return Problem(
        Code.METHOD_NOT_ALLOWED,
        f"{request.method} is not allowed at {request.path}; use {', '.join(allowed)}",
        headers={"Allow": ", ".join(allowed)},
    ).response()
