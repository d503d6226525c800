"""Liveness and readiness, answered on both ports without a token."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.core.runtime import Runtime

#: Readiness fails when Redis has not answered the counters poll for this long.
REDIS_SILENCE = 2.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def health_handlers(runtime: Runtime) -> dict[str, Handler]:
    async def healthz(request: web.BaseRequest) -> web.Response:
        """Liveness: the process answers."""
        return web.json_response({"status": "ok"})

    async def readyz(request: web.BaseRequest) -> web.Response:
        """Readiness: Redis answering, scripts loaded, every campaign's counters present.

        Counters that vanish from Redis while running (a flush, a failover to an empty
        replica) are reported as missing and never recreated by a running process:
        restoring them (or restarting, which writes the file's stock) is an operator's
        decision, because recreating them could sell stock twice.

        A refused reload does not make the gateway unready (the previous configuration
        keeps running) but is reported. From SIGTERM on it says "draining", so a load
        balancer stops sending new buyers while requests in flight finish."""
        waiting = sorted(runtime.registry.by_id.keys() - runtime.initialised)
        missing = sorted(runtime.watch.missing & runtime.registry.by_id.keys())
        silent = time.monotonic() - runtime.watch.last_success
        redis_ok = not runtime.guard.breaker.is_open and silent < REDIS_SILENCE
        ready = redis_ok and not waiting and not missing and not runtime.draining
        document: dict[str, object] = {
            "status": "draining" if runtime.draining else "ready" if ready else "not ready",
            "redis": "ok" if redis_ok else "unreachable",
            "campaigns_waiting": waiting,
            "campaigns_missing": missing,
            "last_reload_error": runtime.reload_error,
        }
        return web.json_response(document, status=200 if ready else 503)

    return {"/healthz": healthz, "/readyz": readyz}
