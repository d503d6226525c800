"""Liveness and readiness, answered on both ports without a token."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.core.snapshot import SnapshotHolder
from gateway.core.stockwatch import StockWatch
from limiter.pipeline import AutoPipeline

#: Readiness fails when Redis has not answered the counters poll for this long.
REDIS_SILENCE = 2.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
#: Answered on both ports, without a token.
HEALTH_PATHS = ("/healthz", "/readyz")


class Readiness:
    """Whether this process should be sent buyers, and why not.

    Counters that vanish from Redis while running (a flush, a failover to an empty
    replica) are reported as missing and never recreated by a running process:
    restoring them (or restarting, which writes the file's stock) is an operator's
    decision, because recreating them could sell stock twice.

    A refused reload does not make the gateway unready (the previous configuration
    keeps running) but is reported. From SIGTERM on it says "draining", so a load
    balancer stops sending new buyers while requests in flight finish."""

    def __init__(self, live: SnapshotHolder, watch: StockWatch, pipe: AutoPipeline) -> None:
        self.live = live
        self.watch = watch
        self.pipe = pipe
        #: Campaigns whose counters are known to exist in Redis.
        self.initialised: set[str] = set()
        #: Why the last reload was refused (None after a good one).
        self.reload_error: str | None = None
        #: Set on SIGTERM: readiness fails while requests in flight finish.
        self.draining = False

    @property
    def initialised_all(self) -> bool:
        return self.initialised >= self.live.current.campaigns.keys()

    def report(self) -> tuple[bool, dict[str, object]]:
        campaigns = self.live.current.campaigns.keys()
        waiting = sorted(campaigns - self.initialised)
        missing = sorted(self.watch.missing & campaigns)
        silent = time.monotonic() - self.watch.last_success
        redis_ok = not self.pipe.unreachable and silent < REDIS_SILENCE
        copies = self.pipe.replication_problem
        ready = redis_ok and not copies and not waiting and not missing and not self.draining
        document: dict[str, object] = {
            "status": "draining" if self.draining else "ready" if ready else "not ready",
            "redis": "ok" if redis_ok else "unreachable",
            "campaigns_waiting": waiting,
            "campaigns_missing": missing,
            # a cluster node down: its campaigns fail closed, the others sell on
            "campaigns_unreachable": sorted(self.watch.unreachable & campaigns),
            "replication": copies or "ok",
            "last_reload_error": self.reload_error,
        }
        return ready, document


def health_handlers(readiness: Readiness) -> dict[str, Handler]:
    async def healthz(request: web.BaseRequest) -> web.Response:
        """Liveness: the process answers."""
        return web.json_response({"status": "ok"})

    async def readyz(request: web.BaseRequest) -> web.Response:
        """Readiness: Redis answering, scripts loaded, every campaign's counters present."""
        ready, document = readiness.report()
        return web.json_response(document, status=200 if ready else 503)

    return {"/healthz": healthz, "/readyz": readyz}
