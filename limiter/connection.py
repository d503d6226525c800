"""The Redis client of one gateway process: one deliberately sized pool.

redis-py's default asyncio pool raises MaxConnectionsError once its cap is
reached; under a flash crowd that would turn into errors. A BlockingConnectionPool
makes callers wait for a free connection instead; the guard's deadline (which does
not count event-loop stalls) bounds that wait. It serves what is not on the
request path (script loads at start, pub/sub, stream groups): request-path
commands go through the auto-pipeline, which opens its own few connections from
the same settings (limiter/resp.py), and the dispatcher's blocking reads get a
pool of their own (a blocking read holds its connection for up to a second).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, *, max_connections: int, timeout: float, retries: int = 1) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,  # the guard's deadline bounds the wait
        socket_connect_timeout=max(timeout, 1.0),
        socket_keepalive=True,
        # Every script is safe to repeat (reserve checks its record, release and
        # commit check state), so one retry after a dropped connection is harmless.
        retry=Retry(NoBackoff(), retries),
    )
    return Redis(connection_pool=pool)
