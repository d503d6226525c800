"""The leased campaign bucket against a real Redis: a grant is never wasted on a
lagging event loop, and never spent twice."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from limiter.buckets import BucketSpec, LeasedBucket
from limiter.scripts import Scripts
from tests.helpers import auto_pipeline

pytestmark = pytest.mark.integration

BUCKET = "fg:{b1}:bucket"
STATE = "fg:{b1}:state"


@pytest.mark.parametrize("lease_ttl", [0.1, 1e-9])
async def test_requests_waiting_for_a_lease_spend_it_however_late_it_arrives(
    redis_server: EmbeddedRedis, redis: Redis, lease_ttl: float
) -> None:
    """1e-9 s: every reply arrives after its lease expired, as on a loop lagging more
    than lease_ttl. The waiters still get the tokens granted for them: exactly the
    capacity (the bucket refills one token per 100 s), nobody more."""
    await redis.delete(BUCKET)
    scripts = Scripts.read()
    async with auto_pipeline(redis_server.url, 2.0) as pipe:
        await pipe.load_scripts(scripts.all())
        bucket = LeasedBucket(
            pipe,
            scripts,
            [BUCKET, STATE],
            BucketSpec.fixed(0.01, 20),
            lease=4,
            fallback=None,
            lease_ttl=lease_ttl,
        )
        verdicts = await asyncio.gather(*(bucket.take() for _ in range(50)))
        assert sum(v.allowed for v in verdicts) == 20
        refused = [v for v in verdicts if not v.allowed]
        assert all(v.retry_after > 0 and not v.exhausted for v in refused)
        # and later requests are refused too: the 20 tokens were the whole bucket
        assert not any([(await bucket.take()).allowed for _ in range(10)])
