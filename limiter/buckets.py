"""Token buckets at the edge, shared by every gateway process through Redis.

Campaign-wide buckets (the rate limit, the stock-proportional admission budget)
are *leased*: a process takes a few tokens per Redis call and spends them
locally, and after Redis says "empty" it refuses locally until the next token is
due. Per-client buckets are too many to lease; their checks ride in one batched
script call per event-loop tick, and a client Redis refused is refused locally
until its next token.

Accuracy: every token is granted by the Redis bucket, by Redis's clock, once.
A leased token is spent at once by a request that was waiting for it, or by a
later request up to ``lease_ttl`` after it was asked for (then it is dropped), so
in any window of T seconds the whole cluster admits at most
``capacity + rate * (T + lease_ttl)`` requests; a single exact bucket would admit
``capacity + rate * T``. Over one second at rate R the excess is at most
``R * lease_ttl`` (10 % with the default 100 ms), however many processes there are.
(A waiting request is admitted when the grant reaches it: an event loop that lags
delays the admission, but never makes a granted token go to waste.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.pipeline import AutoPipeline
from limiter.scripts import Scripts

#: A leased token must be spent within this many seconds, or it is dropped.
LEASE_TTL = 0.1
#: A lease asks for this many seconds' worth of the global rate (at least one token).
LEASE_SHARE = 0.02
#: While Redis is unreachable, buckets fall back to local ones for at least this long.
FALLBACK_SECONDS = 1.0
#: After a stock bucket said "never" (sold out), ask again this soon (stock may come back).
EXHAUSTED_SECONDS = 0.25


class Verdict(NamedTuple):
    allowed: bool
    #: Seconds until a retry may succeed (refusals only).
    retry_after: float = 0.0
    #: The bucket can never refill: the campaign is sold out.
    exhausted: bool = False
    #: Whole tokens left after this one, when known (-1: not known); RateLimit's "r".
    remaining: int = -1


ALLOW = Verdict(True)
NEVER = Verdict(False, exhausted=True)


class LocalBucket:
    """A plain in-process token bucket: the fallback while Redis is unreachable."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self._tokens = self.capacity
        self._last = time.monotonic()

    def take(self, now: float) -> Verdict:
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return ALLOW
        return Verdict(False, (1 - self._tokens) / self.rate if self.rate > 0 else 1.0)


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """What take_tokens.lua needs: fixed (rate/s, capacity) or stock (ratio, window)."""

    kind: str
    a: float
    b: float

    @classmethod
    def fixed(cls, per_second: float, capacity: int) -> BucketSpec:
        return cls("fixed", per_second, capacity)

    @classmethod
    def stock(cls, ratio: float, window: float) -> BucketSpec:
        return cls("stock", ratio, window)


class LeasedBucket:
    """This process's share of a campaign-wide Redis bucket."""

    def __init__(
        self,
        pipe: AutoPipeline,
        scripts: Scripts,
        keys: Sequence[str],
        spec: BucketSpec,
        *,
        lease: int,
        fallback: LocalBucket | None,
        lease_ttl: float = LEASE_TTL,
        known_available: Callable[[], int] | None = None,
    ) -> None:
        self.pipe = pipe
        self.scripts = scripts
        self.keys = list(keys)
        self.spec = spec
        #: A stock bucket of a campaign of several shards: their available units as
        #: this process knows them (no one-slot script can add them up).
        self.known_available = known_available
        self.lease = max(1, lease)
        self.lease_ttl = lease_ttl
        self.fallback = fallback
        self._tokens = 0
        self._expires = 0.0
        self._empty_until = 0.0
        self._exhausted = False
        self._fallback_until = 0.0
        self._waiting = 0
        #: Tokens of the last grant owed to the requests that were waiting for it.
        self._owed = 0
        self._pending: asyncio.Task[None] | None = None
        #: Whole tokens the Redis bucket had left after the last lease.
        self._left = 0

    def try_take(self, now: float) -> Verdict | None:
        """A verdict from what this process already knows, or None: ask Redis."""
        if now < self._fallback_until:
            return self.fallback.take(now) if self.fallback else ALLOW
        if self._tokens > 0 and now < self._expires:
            self._tokens -= 1
            return ALLOW
        if now < self._empty_until:
            return NEVER if self._exhausted else Verdict(False, self._empty_until - now)
        return None

    def remaining(self, now: float) -> int:
        """About how many tokens are left for everyone: what Redis had after the last
        lease, plus this process's unspent share of it (other processes hold theirs)."""
        return self._left + (self._tokens if now < self._expires else 0)

    async def take(self) -> Verdict:
        verdict = self.try_take(time.monotonic())
        if verdict is not None:
            return verdict
        self._waiting += 1
        try:
            for _ in range(3):
                if self._pending is None:
                    self._pending = asyncio.ensure_future(self._lease())
                await asyncio.shield(self._pending)
                if self._owed > 0 and self._tokens > 0:
                    # Granted for this request: however late the reply arrived (a
                    # lagging loop), it is spent now, not dropped as expired.
                    self._owed -= 1
                    self._tokens -= 1
                    return ALLOW
                verdict = self.try_take(time.monotonic())
                if verdict is not None:
                    return verdict
            return Verdict(False, self.lease_ttl)
        finally:
            self._waiting -= 1

    async def _lease(self) -> None:
        want = max(self.lease, self._waiting)
        args: list[str | float] = [self.spec.kind, self.spec.a, self.spec.b, want]
        if self.known_available is not None:
            args.append(self.known_available())
        # A lease lives lease_ttl from when it was asked for, not from when the answer
        # arrived: a slow reply or a busy loop must not stretch the documented bound.
        asked = time.monotonic()
        try:
            reply = await self.pipe.script(self.scripts.take_tokens, self.keys, args, "take tokens")
        except StorageError:
            self._fallback_until = time.monotonic() + FALLBACK_SECONDS
            self._owed = 0
            return
        finally:
            self._pending = None
        granted, wait_ms = int(reply[0]), int(reply[1])
        self._left = int(reply[3]) if len(reply) > 3 else 0
        now = time.monotonic()
        self._tokens = granted + (self._tokens if now < self._expires else 0)
        self._expires = asked + self.lease_ttl
        self._owed = min(granted, self._waiting)
        self._exhausted = wait_ms < 0
        if granted < want:
            self._empty_until = now + (EXHAUSTED_SECONDS if self._exhausted else wait_ms / 1000)


def lease_size(per_second: float, capacity: int) -> int:
    return max(1, min(capacity, math.ceil(per_second * LEASE_SHARE)))


class ClientBuckets:
    """Per-client buckets (one per user or IP), checked in one script call per tick."""

    #: Remembered refusals beyond this many are forgotten (the next request asks Redis).
    MAX_REMEMBERED = 100_000

    def __init__(
        self,
        pipe: AutoPipeline,
        scripts: Scripts,
        key_prefix: str,
        per_second: float,
        capacity: int,
    ) -> None:
        self.pipe = pipe
        self.scripts = scripts
        self.key_prefix = key_prefix
        self.per_second = per_second
        self.capacity = capacity
        self._refused_until: dict[str, float] = {}
        self.batcher: TickBatcher[str, Verdict] = TickBatcher(
            pipe.guard, self._submit, self._parse, "take client tokens"
        )

    async def take(self, client: str) -> Verdict:
        now = time.monotonic()
        until = self._refused_until.get(client)
        if until is not None:
            if now < until:
                return Verdict(False, until - now)
            del self._refused_until[client]
        verdict = await self.batcher.submit(client)
        if not verdict.allowed:
            if len(self._refused_until) >= self.MAX_REMEMBERED:
                self._refused_until.clear()
            self._refused_until[client] = time.monotonic() + verdict.retry_after
        return verdict

    def _submit(self, clients: Sequence[str]) -> asyncio.Future[Any]:
        counts: dict[str, int] = {}
        for client in clients:
            counts[client] = counts.get(client, 0) + 1
        keys = [self.key_prefix + client for client in counts]
        args = [self.per_second, self.capacity, *counts.values()]
        return self.pipe.submit_script(self.scripts.take_client_tokens, keys, args)

    @staticmethod
    def _parse(clients: Sequence[str], reply: Sequence[Any]) -> list[Verdict]:
        grants: dict[str, list[int]] = {}
        for client in clients:
            if client not in grants:
                i = 3 * len(grants)
                grants[client] = [int(reply[i]), int(reply[i + 1]), int(reply[i + 2])]
        verdicts = []
        for client in clients:
            grant = grants[client]
            if grant[0] > 0:
                grant[0] -= 1  # the later requests of this batch took the later tokens
                verdicts.append(Verdict(True, remaining=grant[2] + grant[0]))
            else:
                verdicts.append(Verdict(False, max(grant[1], 1) / 1000, remaining=0))
        return verdicts
