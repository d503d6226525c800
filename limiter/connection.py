"""The redis-py client of one gateway process, for what is not on the request path:
stream groups, the dispatcher's blocking reads (a client of their own), and the
pub/sub of one server or a Sentinel primary.

One server gets a deliberately sized BlockingConnectionPool: redis-py's default
asyncio pool raises MaxConnectionsError once its cap is reached, which under a
flash crowd would turn into errors; here callers wait for a free connection and the
guard's deadline bounds the wait. A Sentinel service gets redis-py's Sentinel client
(each new connection asks the sentinels where the primary is, and one to a demoted
primary is dropped when it answers READONLY); a Redis Cluster gets redis-py's
RedisCluster (commands go to the node of their key, MOVED refreshes its map).
Request-path commands go through the auto-pipeline instead (limiter/pipeline.py).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from limiter.topology import ClusterSlots, SentinelPrimary, Topology

RedisClient = Redis | RedisCluster


def connect(
    url: str, topology: Topology, *, max_connections: int, timeout: float, retries: int = 1
) -> RedisClient:
    options: dict[str, Any] = {
        "socket_connect_timeout": max(timeout, 1.0),
        "socket_keepalive": True,
        # Every script is safe to repeat (reserve checks its record, release and
        # commit check state), so one retry after a dropped connection is harmless.
        "retry": Retry(NoBackoff(), retries),
    }
    if isinstance(topology, SentinelPrimary):
        return _sentinel_client(topology, max_connections, options)
    if isinstance(topology, ClusterSlots):
        return _cluster_client(topology, max_connections, options)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, **options
    )
    return Redis(connection_pool=pool)


def _sentinel_client(
    topology: SentinelPrimary, max_connections: int, options: dict[str, Any]
) -> Redis:
    node = topology.options.client_options
    tls = {k: v for k, v in node.items() if k.startswith("ssl")}
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        [(a.host, a.port) for a in topology.sentinels],
        sentinel_kwargs={"password": topology.sentinel_password, "protocol": 2, **tls},
        protocol=2,
        **node,
    )
    client: Redis = sentinels.master_for(
        topology.service, max_connections=max_connections, check_connection=True, **options
    )
    return client


def _cluster_client(
    topology: ClusterSlots, max_connections: int, options: dict[str, Any]
) -> RedisCluster:
    node = {k: v for k, v in topology.options.client_options.items() if k != "db"}
    options.pop("retry")  # RedisCluster retries redirections and failovers itself
    return RedisCluster(
        startup_nodes=[ClusterNode(a.host, a.port) for a in topology.seeds],
        max_connections=max_connections,
        protocol=2,
        **node,
        **options,
    )


async def disconnect(client: RedisClient) -> None:
    """Close the client's connections (a blocking read on one of them ends); the
    client connects again when next used."""
    if isinstance(client, Redis):
        await client.connection_pool.disconnect()
    else:
        await client.aclose()


async def close(client: RedisClient) -> None:
    await client.aclose()
    await disconnect(client)
