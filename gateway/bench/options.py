"""What a ``flashgate bench`` run was asked to do (the CLI's options, and the report's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.bench import SCENARIOS


@dataclass(frozen=True)
class Options:
    requests: int = 20_000
    seconds: float = 3.0
    concurrency: int = 256
    #: The population buyers are drawn from (default: one per request, at least 1e6).
    buyers: int | None = None
    #: Stock of the oversubscribed sale (default: 1 % of the requests).
    stock: int | None = None
    scenarios: tuple[str, ...] = SCENARIOS
    #: Each comparison runs this many times, its systems alternating.
    rounds: int = 3
    #: Load generator of throughput-only runs: "crowd", "wrk", or "auto" (wrk if found).
    generator: str = "auto"
    #: Share of requests that carry an Idempotency-Key of their own, in every run: real
    #: clients send one, and a keyed request takes another path than an unkeyed one.
    keyed_share: float = 1.0
    #: The latency target's fixed rate (winners/s); half and a tenth of the saturated
    #: rate are measured too, for information.
    latency_rate: float = 1000.0
    #: The Redis every run uses (redis://, redis+sentinel://, redis+cluster://); None:
    #: an embedded redis-server of the bench's own. Flushed between runs.
    redis_url: str | None = None
    #: The idle scenario: catalogue sizes, the wait after start, the measured window.
    idle_campaigns: tuple[int, ...] = (1, 100, 1000)
    idle_settle: float = 5.0
    idle_window: float = 10.0
    progress: bool = True

    def buyers_for(self, requests: int | None) -> int:
        return self.buyers or max(requests or 0, 1_000_000)

    def report(self) -> dict[str, Any]:
        """The options as the report states them."""
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "concurrency": self.concurrency,
            "rounds": self.rounds,
            "scenarios": list(self.scenarios),
            "generator": self.generator,
            "keyed_share": self.keyed_share,
            "latency_rate": self.latency_rate,
            "redis": _shown(self.redis_url) if self.redis_url else "embedded redis-server",
            "idle_campaigns": list(self.idle_campaigns),
            "idle_settle": self.idle_settle,
            "idle_window": self.idle_window,
        }


def _shown(url: str) -> str:
    """A URL without its password (a report gets pasted into issues)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hosts}"
