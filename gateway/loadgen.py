"""A flash-sale crowd: many buyers, many requests, bounded concurrency, loopback only.

Used by ``flashgate demo`` and ``flashgate bench``. Every answer is tallied by its
outcome (``201`` for a win, else the problem's ``code``) with its latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True, slots=True)
class Crowd:
    url: str
    buyers: int
    requests: int
    concurrency: int
    max_quantity: int = 1
    #: Share of requests that carry an Idempotency-Key and are sent twice.
    retry_share: float = 0.0
    identity_header: str = "X-User-Id"
    seed: int = 1


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    #: reservation id -> (user, units) of every 2xx answer
    wins: dict[str, tuple[str, int]] = field(default_factory=dict)
    sent: int = 0
    elapsed: float = 0.0

    def record(self, outcome: str, latency: float) -> None:
        self.outcomes[outcome] += 1
        self.latencies.setdefault(outcome, []).append(latency)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0


async def run_crowd(crowd: Crowd, on_answer: Callable[[], None] | None = None) -> Tally:
    tally = Tally()
    rng = random.Random(crowd.seed)
    plan = [
        (
            f"buyer-{rng.randrange(crowd.buyers)}",
            rng.randint(1, crowd.max_quantity),
            rng.random() < crowd.retry_share,
        )
        for _ in range(crowd.requests)
    ]
    queue = iter(enumerate(plan))
    connector = aiohttp.TCPConnector(limit=crowd.concurrency, force_close=False)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for index, (user, quantity, retried) in queue:
                headers = {crowd.identity_header: user}
                if retried:
                    headers["Idempotency-Key"] = f"req-{index}"
                for _ in range(2 if retried else 1):
                    await _one(session, crowd.url, headers, user, quantity, tally)
                    if on_answer:
                        on_answer()

        await asyncio.gather(*(worker() for _ in range(crowd.concurrency)))
    tally.elapsed = time.perf_counter() - started
    return tally


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    user: str,
    quantity: int,
    tally: Tally,
) -> None:
    body = b'{"quantity": %d}' % quantity
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            outcome = _outcome(response.status, response.content_type, payload)
            rid = response.headers.get("X-Reservation-Id")
            if 200 <= response.status < 300 and rid:
                tally.wins[rid] = (user, quantity)
    except aiohttp.ClientError as exc:
        outcome = f"error:{type(exc).__name__}"
    tally.sent += 1
    tally.record(outcome, time.perf_counter() - started)


def _outcome(status: int, content_type: str, payload: bytes) -> str:
    if content_type == "application/problem+json":
        try:
            return str(json.loads(payload).get("code", status))
        except ValueError:
            pass
    return str(status)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
