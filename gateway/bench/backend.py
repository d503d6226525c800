"""A small built-in order backend for ``flashgate demo`` and ``flashgate bench``.

It accepts every order, remembers which reservations reached it (and with how
many units, for which user), and can add a little latency like a real database.
``GET /_orders`` tells what it saw; ``POST /_reset`` forgets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class StubBackend:
    latency: tuple[float, float] = (0.0, 0.0)
    #: reservation id -> (user, units); a repeated delivery shows up in ``duplicates``.
    orders: dict[str, tuple[str, int]] = field(default_factory=dict)
    duplicates: int = 0
    calls: int = 0
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_orders", self._report)
        app.router.add_post("/_reset", self._reset)
        app.router.add_route("*", "/{tail:.*}", self._order)
        return app

    async def _report(self, request: web.Request) -> web.Response:
        orders = {rid: [user, units] for rid, (user, units) in self.orders.items()}
        return web.json_response(
            {"orders": orders, "duplicates": self.duplicates, "calls": self.calls}
        )

    async def _reset(self, request: web.Request) -> web.Response:
        self.orders.clear()
        self.duplicates = self.calls = 0
        return web.json_response({"reset": True})

    async def _order(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.read()
        if self.latency[1] > 0:
            await asyncio.sleep(random.uniform(*self.latency))
        rid = request.headers.get("X-Reservation-Id", "")
        if rid in self.orders:
            self.duplicates += 1
        self.orders[rid] = (
            request.headers.get("X-User-Id", ""),
            int(request.headers.get("X-Quantity", "1")),
        )
        return web.json_response({"order": rid, "status": "created"}, status=201)

    def units_by_user(self) -> dict[str, int]:
        units: dict[str, int] = {}
        for user, quantity in self.orders.values():
            units[user] = units.get(user, 0) + quantity
        return units


@contextlib.asynccontextmanager
async def serve_backend(backend: StubBackend, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``backend`` on a free port; yields its base URL."""
    runner = web.AppRunner(backend.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    backend.url = f"http://{host}:{port}"
    try:
        yield backend.url
    finally:
        await runner.cleanup()
