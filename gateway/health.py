"""Liveness and readiness, answered on both ports without a token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.runtime import Runtime

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def health_handlers(runtime: Runtime) -> dict[str, Handler]:
    async def healthz(request: web.Request) -> web.Response:
        """Liveness: the process answers."""
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Readiness: scripts loaded and every campaign's counters present in Redis."""
        waiting = sorted(runtime.registry.by_id.keys() - runtime.initialised)
        if waiting:
            return web.json_response(
                {"status": "not ready", "campaigns_waiting": waiting}, status=503
            )
        return web.json_response({"status": "ready"})

    return {"/healthz": healthz, "/readyz": readyz}
