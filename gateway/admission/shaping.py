"""A campaign's edge limits, cheapest first: the sale window (local clock), the
per-client bucket, the campaign's rate limit, and the stock-proportional
admission budget (all three shared through Redis).

Each limit has a mode: ``enforce`` refuses with 429 ``rate-limited``; ``shadow``
never refuses and counts what it would have refused, so a shop can tune its
limits on real traffic first. While Redis is unreachable, the campaign-wide
buckets fall back to local ones (the deduction itself stays fail-closed).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime

from aiohttp import web

from gateway.admission.clientip import client_ip, rate_key
from gateway.admission.ratelimit_fields import Policy, RateLimitFields
from gateway.config import CampaignSettings, GatewaySettings
from gateway.problems import Code, Problem, retry_after
from limiter.buckets import (
    BucketSpec,
    ClientBuckets,
    LeasedBucket,
    LocalBucket,
    Verdict,
    lease_size,
)
from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.pipeline import AutoPipeline
from limiter.scripts import Scripts

RATE_LIMIT = "rate_limit"
CLIENT_RATE_LIMIT = "client_rate_limit"
ADMISSION = "admission_ratio"


class Shaper:
    def __init__(
        self,
        settings: CampaignSettings,
        gateway: GatewaySettings,
        pipe: AutoPipeline,
        scripts: Scripts,
        keys: CampaignKeys,
        on_sold_out: Callable[[], None],
        known_available: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.trusted = gateway.trusted_proxies
        #: gateway.retry_after_jitter, for every Retry-After of this campaign's answers
        self.jitter = gateway.retry_after_jitter
        self.on_sold_out = on_sold_out
        self.starts = settings.starts_at.timestamp() if settings.starts_at else None
        self.ends = settings.ends_at.timestamp() if settings.ends_at else None
        #: Requests a shadow-mode limit would have refused, and enforced refusals, by limit.
        self.shadowed: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.rate: LeasedBucket | None = None
        self.admission: LeasedBucket | None = None
        self.clients: ClientBuckets | None = None
        if (r := settings.rate_limit) is not None:
            self.rate = LeasedBucket(
                pipe,
                scripts,
                [keys.bucket, keys.state],
                BucketSpec.fixed(r.per_second, r.capacity),
                lease=lease_size(r.per_second, r.capacity),
                fallback=LocalBucket(r.per_second, r.capacity),
            )
        if (a := settings.admission_ratio) is not None:
            self.admission = LeasedBucket(
                pipe,
                scripts,
                [keys.admission, keys.state],
                BucketSpec.stock(a.ratio, a.window),
                # sized by the file's stock: the bucket itself follows the live stock
                lease=lease_size(
                    a.ratio * settings.stock / a.window, round(a.ratio * settings.stock)
                ),
                fallback=None,  # without Redis nothing is admitted anyway
                known_available=known_available,  # several shards: what this process knows
            )
        if (c := settings.client_rate_limit) is not None:
            self.clients = ClientBuckets(
                pipe, scripts, keys.client_buckets + c.key + ":", c.per_second, c.capacity
            )
        self.fields = RateLimitFields(gateway.ratelimit_headers, _policies(settings))

    def share(self, processes: int) -> None:
        """Size the local fallback bucket for this many live processes."""
        r = self.settings.rate_limit
        if r is not None and self.rate is not None:
            share = r.local_share or 1 / max(processes, 1)
            self.rate.fallback = LocalBucket(r.per_second * share, r.capacity * share)

    def window(self, now: float | None = None) -> Problem | None:
        """403 before the start (with Retry-After) or after the end; no Redis."""
        now = time.time() if now is None else now
        if self.starts is not None and now < self.starts:
            wait = math.ceil(self.starts - now)
            return Problem(
                Code.NOT_STARTED,
                f"the sale starts at {_iso(self.settings.starts_at)}",
                headers={"Retry-After": str(max(wait, 1))},
                starts_at=_iso(self.settings.starts_at),
            )
        if self.ends is not None and now >= self.ends:
            return Problem(
                Code.ENDED,
                f"the sale ended at {_iso(self.settings.ends_at)}",
                ends_at=_iso(self.settings.ends_at),
            )
        return None

    async def admit(
        self, request: web.BaseRequest, user: str, *, retry: bool = False
    ) -> Mapping[str, str] | None:
        """Raise a 429 (or sold-out) Problem when a limit in enforce mode says no; the
        RateLimit header fields for the answer when they let it through (None: none).

        ``retry``: the request carries an Idempotency-Key; when the admission budget is
        gone because stock is, it still goes to Redis, which may owe it a stored answer.
        """
        left: list[int] = []  # tokens left in each bucket of self.fields, in order
        if self.clients is not None and (c := self.settings.client_rate_limit) is not None:
            client = user if c.key == "user" else rate_key(client_ip(request, self.trusted))
            try:
                verdict = await self.clients.take(client)
            except StorageError:
                verdict = Verdict(True)  # the deduction decides, fail-closed, without Redis
            if c.mode == "enforce":
                left.append(verdict.remaining if verdict.remaining >= 0 else c.capacity)
            self._judge(
                CLIENT_RATE_LIMIT, c.mode, verdict, f"this {c.key} sends too many requests", left
            )
        if self.rate is not None and (r := self.settings.rate_limit) is not None:
            now = time.monotonic()
            verdict = self.rate.try_take(now) or await self.rate.take()
            if r.mode == "enforce":
                left.append(self.rate.remaining(now))
            self._judge(
                RATE_LIMIT, r.mode, verdict, "the campaign's request rate is exhausted", left
            )
        admitted = self.fields.admitted(left) if self.fields.enabled else None
        if self.admission is not None and (a := self.settings.admission_ratio) is not None:
            verdict = self.admission.try_take(time.monotonic()) or await self.admission.take()
            if verdict.exhausted and (retry or self.admission.known_available is not None):
                # a keyed request may be owed a stored answer; a campaign of several
                # shards is sold out only when Redis says so after looking at every shard
                return admitted
            if verdict.exhausted:
                self.on_sold_out()
                raise Problem(
                    Code.SOLD_OUT,
                    f"campaign {self.settings.id} is sold out",
                    campaign=self.settings.id,
                )
            self._judge(
                ADMISSION, a.mode, verdict, "enough buyers are already trying for what is left"
            )
        return admitted

    def _judge(
        self, limit: str, mode: str, verdict: Verdict, why: str, left: list[int] | None = None
    ) -> None:
        if verdict.allowed:
            return
        if mode == "shadow":
            self.shadowed[limit] += 1
            return
        self.refused[limit] += 1
        retry = retry_after(verdict.retry_after, self.jitter)
        headers = {"Retry-After": retry}
        if left is not None and self.fields.enabled:
            headers.update(self.fields.refused(len(left) - 1, math.ceil(verdict.retry_after), left))
        raise Problem(Code.RATE_LIMITED, f"{why}; retry in {retry}s", headers=headers, limit=limit)


def _policies(settings: CampaignSettings) -> list[Policy]:
    """The buckets RateLimit fields describe, in the order admit() checks them (the
    admission budget is left out: it follows the stock, and would publish it)."""
    policies = []
    if (c := settings.client_rate_limit) is not None and c.mode == "enforce":
        policies.append(Policy("client", c.capacity, c.per_second))
    if (r := settings.rate_limit) is not None and r.mode == "enforce":
        policies.append(Policy("campaign", r.capacity, r.per_second))
    return policies


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment else ""
