"""Redis failover: with redis.wait_for_replicas a sale counts only once a replica has
it, so promoting that replica cannot forget a sale a backend was told about."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from tests.helpers import Shop, as_text, check_invariant, open_gateway, settings_for, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def primary() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def replica(primary: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
    server.start()
    yield server
    server.close()


@pytest.fixture
async def primary_client(primary: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(primary.url)
    yield client
    await client.aclose()


async def _replicated(client: Redis) -> bool:
    """One replica, done with its initial sync (only then does it acknowledge WAIT)."""
    info = await client.info("replication")
    replica = info.get("slave0") or {}
    return int(info.get("connected_slaves", 0)) == 1 and replica.get("state") == "online"


async def test_a_sale_waits_for_a_replica_and_fails_closed_without_one(
    settings_data: dict[str, Any],
    primary: EmbeddedRedis,
    replica: EmbeddedRedis,
    primary_client: Redis,
    shop: Shop,
) -> None:
    settings_data["redis"] = {"wait_for_replicas": 1, "replica_timeout": "100ms", "timeout": "1s"}
    await wait_for(lambda: _replicated(primary_client), within=10)
    async with open_gateway(settings_for(settings_data), primary.url) as gateway:
        await wait_for(lambda: gateway.runtime.readiness.initialised_all, within=15)
        assert (await gateway.buy("alice")).status == 201
        # the sale is on the replica: a promoted replica would know it
        replica_client = Redis.from_url(replica.url)
        on_replica = as_text(await replica_client.hgetall("fg:{phone-1111}:state"))
        assert (on_replica["sold"], on_replica["available"]) == ("1", "9")

        replica.stop()
        await wait_for(lambda: _replicated_count(primary_client, 0), within=10)
        refused = await gateway.buy("bob")
        assert refused.status == 503  # written to the primary only: not counted, not sold
        assert len(shop.seen) == 1

        replica.start()
        await wait_for(lambda: _replicated(primary_client), within=15)
        await wait_for(lambda: gateway.runtime.readiness.initialised_all, within=15)

        async def settled() -> bool:
            figures = as_text(await primary_client.hgetall("fg:{phone-1111}:state"))
            return figures["reserved"] == "0"

        await wait_for(settled, within=30)  # bob's unanswered reservation was undone
        assert (await gateway.buy("carol")).status == 201
        await replica_client.aclose()
    state = await check_invariant(primary_client, "phone-1111", per_user_limit=1)
    assert (state["sold"], state["reserved"]) == (2, 0)
    assert len(shop.seen) == 2


async def _replicated_count(client: Redis, count: int) -> bool:
    info = await client.info("replication")
    return int(info.get("connected_slaves", 0)) == count
