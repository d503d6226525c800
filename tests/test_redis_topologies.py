"""The Redis layer on real Sentinel and Cluster topologies: the auto-pipeline finds the
primary and follows a failover, routes each campaign to the node that owns its slot,
follows a slot that migrates while it is used, and sharded notices reach a listener."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.embedded.topology import ClusterTopology, SentinelTopology
from limiter.connection import close, connect
from limiter.errors import StorageError
from limiter.guard import RedisGuard
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.notices import Notices
from limiter.pipeline import AutoPipeline, Durability
from limiter.records import Attempt, ReserveStatus
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from limiter.topology import Address, topology_for
from tests.helpers import check_invariant, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPTS = Scripts.read()


@contextlib.asynccontextmanager
async def pipeline(url: str, *, replicas: int = 0) -> AsyncIterator[AutoPipeline]:
    guard = RedisGuard(1.0)
    pipe = AutoPipeline(topology_for(url, timeout=1.0), guard, durability=Durability(replicas, 500))
    await pipe.start()
    try:
        yield pipe
    finally:
        await pipe.close()
        guard.close()


def store(pipe: AutoPipeline, campaign: str) -> CampaignStore:
    return CampaignStore(pipe, SCRIPTS, CampaignKeys(campaign), StorePolicy(5, 0, 1000))


async def buy(campaign: CampaignStore, user: str, quantity: int = 1) -> ReserveStatus:
    attempt = Attempt(new_reservation_id(campaign.campaign_id), user, quantity)
    (decision,) = await campaign.reserve([attempt])
    return decision.status


async def answers(call: Callable[[], object]) -> bool:
    try:
        await call()  # type: ignore[misc]
    except StorageError:
        return False
    return True


@contextlib.asynccontextmanager
async def node_client(port: int) -> AsyncIterator[Redis]:
    client = Redis(port=port)
    try:
        yield client
    finally:
        await client.aclose()


def campaigns_on_every_primary(cluster: ClusterTopology, prefix: str) -> dict[int, str]:
    """A campaign id per primary, the first ``prefix-N`` whose hash tag lands there (each
    test its own prefix: the shared cluster keeps what earlier tests wrote)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(cluster.primaries()):
        campaign = f"{prefix}-{n}"
        found.setdefault(cluster.primary_for_key(CampaignKeys(campaign).state), campaign)
        n += 1
    return found


# --- Sentinel ------------------------------------------------------------------------


async def test_a_sentinel_url_reaches_the_primary_and_follows_a_failover(
    fresh_sentinel: Callable[..., SentinelTopology],
) -> None:
    sentinel = fresh_sentinel()
    async with pipeline(sentinel.url, replicas=2) as pipe:
        phone = store(pipe, "phone")
        await pipe.load_scripts(SCRIPTS.all())
        await phone.init(100)
        assert await buy(phone, "alice") is ReserveStatus.RESERVED  # on both replicas
        old = sentinel.kill_primary()
        with pytest.raises(StorageError):  # fail closed while there is no primary
            await phone.figures()
        new = await asyncio.to_thread(sentinel.wait_for_failover, old)
        # two replicas had every write, but the promoted one has one replica now: a
        # write waiting for two fails closed, and says so; a read goes through
        await wait_for(lambda: answers(phone.figures), within=20)
        assert pipe.topology.primaries() == [Address("127.0.0.1", new)]
        figures = await phone.figures()
        assert (figures.available, figures.reserved) == (99, 1)
        with pytest.raises(StorageError, match="replica"):
            await buy(phone, "bob")
        assert pipe.replication_problem is not None
        pipe.durability.replicas = 1
        assert await buy(phone, "bob") is ReserveStatus.RESERVED
        assert pipe.replication_problem is None


async def test_a_sentinel_url_answers_after_the_old_primary_returns_as_a_replica(
    fresh_sentinel: Callable[..., SentinelTopology],
) -> None:
    """The killed primary comes back as a replica: writes sent to it would be answered
    READONLY; the pipeline stays with the new primary."""
    sentinel = fresh_sentinel()
    async with pipeline(sentinel.url, replicas=1) as pipe:
        phone = store(pipe, "phone")
        await phone.init(10)
        old = sentinel.kill_primary()
        new = await asyncio.to_thread(sentinel.wait_for_failover, old)
        sentinel.restart(old)
        await wait_for(lambda: answers(phone.figures), within=20)
        assert await buy(phone, "alice") is ReserveStatus.RESERVED
        assert pipe.topology.primaries() == [Address("127.0.0.1", new)]


# --- Cluster -------------------------------------------------------------------------


async def test_each_campaign_is_decided_on_the_node_that_owns_its_slot(
    cluster_topology: ClusterTopology,
) -> None:
    on = campaigns_on_every_primary(cluster_topology, "owned")
    async with pipeline(cluster_topology.url) as pipe:
        await pipe.load_scripts(SCRIPTS.all())
        stores = {port: store(pipe, campaign) for port, campaign in on.items()}
        for port, campaign in stores.items():
            await campaign.init(3)
            statuses = await asyncio.gather(*(buy(campaign, f"u{i}") for i in range(5)))
            assert statuses.count(ReserveStatus.RESERVED) == 3
            async with node_client(port) as node:
                assert await node.hget(campaign.keys.state, "available") == b"0"
                await check_invariant(node, campaign.campaign_id, per_user_limit=5)
        assert sorted(pipe.topology.primaries()) == sorted(Address("127.0.0.1", p) for p in on)


async def test_a_campaign_whose_slot_moves_follows_it(cluster_topology: ClusterTopology) -> None:
    """MOVED after a whole migration; ASK and TRYAGAIN while it is half done (fail
    closed, then decided on the new owner); the books stay whole."""
    campaign_id = "moving-1"
    keys = CampaignKeys(campaign_id)
    slot = key_slot(keys.state.encode())
    source = cluster_topology.primary_for_slot(slot)
    target = next(p for p in cluster_topology.primaries() if p != source)
    async with pipeline(cluster_topology.url) as pipe:
        moving = store(pipe, campaign_id)
        await moving.init(50)
        for i in range(5):
            assert await buy(moving, f"before-{i}") is ReserveStatus.RESERVED
        cluster_topology.begin_migration(slot, target)
        cluster_topology.move_keys(slot, target, count=2)
        half = await asyncio.gather(
            *(buy(moving, f"during-{i}") for i in range(10)), return_exceptions=True
        )
        assert all(r is ReserveStatus.RESERVED or isinstance(r, StorageError) for r in half)
        cluster_topology.finish_migration(slot, target)
        for i in range(5):
            assert await buy(moving, f"after-{i}") is ReserveStatus.RESERVED
        assert pipe.topology.address(keys.state) == Address("127.0.0.1", target)
        async with node_client(target) as node:
            state = await check_invariant(node, campaign_id, per_user_limit=5)
        won = 10 + sum(r is ReserveStatus.RESERVED for r in half)
        assert (state["reserved"], state["available"]) == (won, 50 - won)
        cluster_topology.migrate_slot(slot, source)  # leave the shared cluster as it was


async def test_a_primary_killed_fails_over_and_the_other_shards_never_stop(
    fresh_cluster: Callable[..., ClusterTopology],
) -> None:
    cluster = fresh_cluster(replicas_per_primary=2)
    on = campaigns_on_every_primary(cluster, "killed")
    victim, *others = list(on)
    async with pipeline(cluster.url, replicas=1) as pipe:
        stores = {port: store(pipe, campaign) for port, campaign in on.items()}
        for campaign in stores.values():
            await campaign.init(1000)
        cluster.kill(victim)
        failover = asyncio.ensure_future(asyncio.to_thread(cluster.wait_for_failover, victim))
        bought, others_failed = 0, 0
        while not failover.done():  # buying on the other shards the whole time
            for port in others:
                bought += 1
                if await buy(stores[port], f"u-{bought}") is not ReserveStatus.RESERVED:
                    others_failed += 1
            await asyncio.sleep(0.05)
        await failover
        await wait_for(lambda: answers(stores[victim].figures), within=20)
        assert await buy(stores[victim], "after") is ReserveStatus.RESERVED
        assert (bought > 0, others_failed) == (True, 0)


async def test_sharded_notices_reach_a_listener_on_the_owning_node(
    cluster_topology: ClusterTopology,
) -> None:
    on = campaigns_on_every_primary(cluster_topology, "notice")
    got: list[tuple[str, bytes]] = []
    async with pipeline(cluster_topology.url) as pipe:
        client = connect(cluster_topology.url, pipe.topology, max_connections=4, timeout=1.0)
        notices = Notices(pipe.topology, client, interval=0.1)
        channels = [CampaignKeys(c).events for c in on.values()]
        listener = asyncio.ensure_future(
            notices.follow(lambda: channels, lambda ch, data: got.append((ch, data)))
        )
        try:

            async def subscribed() -> bool:
                for port, campaign in on.items():
                    channel = CampaignKeys(campaign).events
                    async with node_client(port) as node:
                        reply = await node.execute_command(  # type: ignore[no-untyped-call]
                            "PUBSUB", "SHARDNUMSUB", channel
                        )
                    if int(reply[1]) < 1:
                        return False
                return True

            await wait_for(subscribed, within=10)
            for campaign in [store(pipe, c) for c in on.values()]:
                await campaign.init(1)
                assert await buy(campaign, "only") is ReserveStatus.RESERVED  # now sold out
            await wait_for(lambda: len(got) == len(on), within=5)
            assert sorted(got) == sorted((ch, b"sold-out") for ch in channels)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await close(client)
