"""One hot item over several shards, and carts across campaigns, on a real Redis
Cluster of three primaries (two replicas each) on loopback: the shards land on
different nodes, exactly the stock is sold, the per-user limit holds across shards,
nobody is told sold-out while a unit remains, live adjustments keep the books, and no
cart ever gets one item without the other. Each test has a key prefix of its own: the
cluster is shared by the session."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import RedisCluster

from gateway.embedded.topology import ClusterTopology
from limiter.keys import CampaignKeys, shard_tags
from tests.helpers import AUTH, Gateway, check_invariant, open_gateway, settings_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAMPAIGN, CASE = "phone-1111", "case-1111"
_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    return f"cl{next(_prefixes)}x{random.randrange(10**6)}"


@pytest.fixture
async def cluster_client(cluster_topology: ClusterTopology) -> AsyncIterator[RedisCluster]:
    first = cluster_topology.nodes[0]
    client = RedisCluster(host="127.0.0.1", port=first.port)
    yield client
    await client.aclose()


@pytest.fixture
async def on_cluster(
    settings_data: dict[str, Any], cluster_topology: ClusterTopology, prefix: str
) -> AsyncIterator[Gateway]:
    settings_data["redis"] = {"timeout": "3s", "key_prefix": prefix}
    settings_data["upstreams"]["shop"]["timeout"] = 10.0
    settings_data["campaigns"][0].update(
        {"stock": 300, "per_user_limit": 2, "max_quantity": 2, "shards": 4}
    )
    settings_data["campaigns"].append(
        {"id": CASE, "route": f"POST /seckill/{CASE}", "upstream": "shop", "stock": 120}
    )
    settings_data["carts"] = [
        {
            "id": "bundle",
            "route": "POST /seckill/bundle",
            "upstream": "shop",
            "campaigns": [CAMPAIGN, CASE],
        }
    ]
    async with open_gateway(settings_for(settings_data), cluster_topology.url) as gateway:
        yield gateway


async def books(client: RedisCluster, prefix: str) -> list[dict[str, int]]:
    """Every shard's counters, each shard's books checked."""
    return [await check_invariant(client, tag, 2, prefix) for tag in shard_tags(CAMPAIGN, 4)]


def totals(shards: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(s[k] for s in shards) for k in ("available", "reserved", "sold", "stock_total")}


async def crowd(
    gateway: Gateway, path: str, body: Any, requests: int, users: int
) -> list[tuple[int, dict[str, Any]]]:
    url = str(gateway.edge.make_url(path))

    async def attempt(session: aiohttp.ClientSession, i: int) -> tuple[int, dict[str, Any]]:
        headers = {"X-User-Id": f"user-{i % users}", "Idempotency-Key": f"k-{i}"}
        async with session.post(url, json=body(i), headers=headers) as response:
            document: dict[str, Any] = await response.json(content_type=None)
            return response.status, document

    # a thousand connections at once: five thousand would overflow the test server's
    # accept backlog on a loaded machine (connect timeouts, not the gateway's answer)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:
        return await asyncio.gather(*(attempt(session, i) for i in range(requests)))


def test_the_shards_land_on_different_nodes(cluster_topology: ClusterTopology) -> None:
    tags = shard_tags(CAMPAIGN, 6)
    keys = [CampaignKeys(CAMPAIGN, "fg", j, tag).state for j, tag in enumerate(tags)]
    owners = collections.Counter(cluster_topology.primary_for_key(key) for key in keys)
    assert sorted(owners.values()) == [2, 2, 2], owners  # six shards, two on each primary


async def test_four_shards_on_a_cluster_sell_exactly_the_stock(
    on_cluster: Gateway, cluster_client: RedisCluster, prefix: str
) -> None:
    rng = random.Random(3)
    quantities = [rng.choice([1, 1, 2]) for _ in range(5000)]
    results = await crowd(
        on_cluster, f"/seckill/{CAMPAIGN}", lambda i: {"quantity": quantities[i]}, 5000, 2000
    )
    statuses = collections.Counter(status for status, _ in results)
    assert set(statuses) <= {201, 403, 409}, statuses
    shards = await books(cluster_client, prefix)
    assert totals(shards) == {"available": 0, "reserved": 0, "sold": 300, "stock_total": 300}
    assert all(s["sold"] > 0 for s in shards), shards
    assert any(document.get("code") == "sold-out" for _, document in results)


async def test_one_user_a_hundred_attempts_at_once_on_a_cluster(
    on_cluster: Gateway, cluster_client: RedisCluster, prefix: str
) -> None:
    answers = await asyncio.gather(*(on_cluster.buy("greedy", key=f"g-{i}") for i in range(100)))
    assert sum(1 for a in answers if a.status == 201) == 2
    assert totals(await books(cluster_client, prefix))["reserved"] == 0
    assert totals(await books(cluster_client, prefix))["sold"] == 2


async def test_an_emptied_shard_and_live_adjustments_on_a_cluster(
    on_cluster: Gateway, cluster_client: RedisCluster, prefix: str
) -> None:
    """Shard 0 emptied by hand; stock added and taken away while 150 buy: everyone wins
    (units move to the shards that need them), and the books hold per shard."""
    first = on_cluster.runtime.snapshot.campaigns[CAMPAIGN].shards[0]
    emptied = (await first.store.figures()).available
    await first.store.adjust(delta=-emptied, actor="test")  # stock_total falls with it
    buying = asyncio.ensure_future(
        asyncio.gather(*(on_cluster.buy(f"u-{i}", key=f"a-{i}") for i in range(150)))
    )
    for delta in (40, -20):
        change = {"delta": delta}
        answer = await on_cluster.admin.post(
            f"/campaigns/{CAMPAIGN}/stock", json=change, headers=AUTH
        )
        assert answer.status == 200, await answer.text()
    answers = await buying
    assert {a.status for a in answers} == {201}
    shards = await books(cluster_client, prefix)
    assert totals(shards)["stock_total"] == 300 - emptied + 20
    assert totals(shards)["sold"] == 150
    assert totals(shards)["available"] == 300 - emptied + 20 - 150


async def test_carts_on_a_cluster_are_whole(
    on_cluster: Gateway, cluster_client: RedisCluster, prefix: str, shop: Any
) -> None:
    """2,000 buyers of a cart of a sharded campaign and another one: the cases run out
    first, and no order has one item without the other."""

    def order(i: int) -> dict[str, Any]:
        return {"items": [{"campaign": CAMPAIGN, "quantity": 1}, {"campaign": CASE}]}

    results = await crowd(on_cluster, "/seckill/bundle", order, 2000, 2000)
    statuses = collections.Counter(status for status, _ in results)
    assert statuses[201] == 120, statuses
    shards = await books(cluster_client, prefix)
    case = await check_invariant(cluster_client, CASE, 1, prefix)
    assert case["sold"] == 120
    assert totals(shards)["sold"] == 120
    assert totals(shards)["reserved"] == 0
    assert len(shop.seen) == 120
    refused = [d for status, d in results if status == 409]
    assert {d["campaign"] for d in refused} == {CASE}
