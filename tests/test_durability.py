"""A sale counts only with the copies it was promised (redis.wait_for_replicas,
redis.wait_for_aof): without them the gateway fails closed and says why, in the
buyer's answer, on /readyz, in the metrics and in the log."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from limiter.errors import StorageError
from limiter.guard import RedisGuard
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.pipeline import AutoPipeline, Durability
from limiter.records import Attempt
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from limiter.topology import topology_for
from tests.helpers import open_gateway, problem_of, settings_for, wait_for

pytestmark = pytest.mark.integration


async def _store_waiting_for(
    url: str, durability: Durability
) -> tuple[AutoPipeline, CampaignStore]:
    pipe = AutoPipeline(topology_for(url, timeout=1.0), RedisGuard(1.0), durability=durability)
    store = CampaignStore(pipe, Scripts.read(), CampaignKeys("copies"), StorePolicy(1, 0, 1000))
    return pipe, store


@pytest.mark.parametrize(
    ("durability", "said"),
    [
        (Durability(replicas=1, replica_timeout_ms=50), r"only 0 of 1 replica\(s\)"),
        (Durability(replicas=0, replica_timeout_ms=50, aof=True), "WAITAOF"),
    ],
    ids=["no-replica", "waitaof-refused"],
)
async def test_a_write_without_its_copies_fails_closed_and_says_why(
    redis_server: EmbeddedRedis, redis: Redis, durability: Durability, said: str
) -> None:
    pipe, store = await _store_waiting_for(redis_server.url, durability)
    try:
        with pytest.raises(StorageError, match=said):
            await store.reserve([Attempt(new_reservation_id("copies"), "alice", 1)])
        assert re.search(said, pipe.replication_problem or "")
        assert pipe.unreplicated_round_trips == 1
        # reads wait for nothing: they still answer
        assert await pipe.call("HGET", "copies-missing", "f", what="read") is None
    finally:
        await pipe.close()
        pipe.guard.close()


async def test_the_gateway_shows_missing_copies_on_readyz_and_keeps_reading(
    redis_server: EmbeddedRedis, redis: Redis, settings_data: dict[str, Any]
) -> None:
    settings_data["redis"] = {"wait_for_replicas": 1, "replica_timeout": "50ms"}
    async with open_gateway(settings_for(settings_data), redis_server.url) as gw:
        # the counters are created by a script, which waits for a replica too: the
        # campaign never gets them, and says why
        answer = await gw.buy("alice")
        assert answer.status == 503
        assert (await problem_of(answer))["code"] == "unavailable"

        async def readiness() -> dict[str, Any]:
            ready = await gw.admin.get("/readyz")
            assert ready.status == 503
            document: dict[str, Any] = await ready.json()
            return document

        # Redis answers the stock poll (reads wait for nothing): it is the copies that lack
        await wait_for(lambda: _redis_ok(readiness()), within=5)
        assert "replica" in (await readiness())["replication"]

        async def counted() -> bool:
            metrics = await (await gw.admin.get("/metrics")).text()
            name = "flashgate_redis_unreplicated_total "
            line = next((row for row in metrics.splitlines() if row.startswith(name)), "")
            return bool(line) and float(line.split()[1]) > 0

        await wait_for(counted, within=5)


async def _redis_ok(document: Any) -> bool:
    return bool((await document)["redis"] == "ok")
