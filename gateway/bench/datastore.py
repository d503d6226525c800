"""The Redis a bench runs on, and what the bench does to it around its runs.

flashgate is given the URL as it is: one server, a Sentinel service or a cluster.
The baselines speak to one server, so they get the data node the bench campaign's
keys live on (the primary the sentinels name, confirmed by ROLE; the cluster node
that owns the campaign's slot), found the way flashgate finds it
(limiter/topology.py): every ratio then compares work done on the same node.

Flushing (FLUSHDB: the URL's database only) and counting go to every primary: on a
cluster a gateway's background work (its heartbeat, other campaigns) may live on a
node other than the campaign's. Each primary is read on one connection of its own,
opened once, so that the bench's own connection handshakes never land between two
readings.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from gateway.embedded.topology import ClusterTopology, SentinelTopology
from limiter.keys import CampaignKeys
from limiter.topology import Address, Topology, topology_for

#: Deadline of the bench's own questions to the sentinels and the cluster nodes.
ASK_TIMEOUT = 2.0


@dataclass
class Datastore:
    #: What flashgate is given.
    url: str
    #: The data node holding the bench campaign's keys (redis:// URL), for the baselines.
    campaign_node: str
    #: Every primary (redis:// URLs); the campaign node is one of them.
    primaries: tuple[str, ...]
    #: What it is, for the report (never with a password).
    description: str = ""
    _clients: dict[str, Redis] = field(default_factory=dict)

    def client(self, node: str) -> Redis:
        if node not in self._clients:
            self._clients[node] = Redis.from_url(node, single_connection_client=True)
        return self._clients[node]

    @property
    def campaign(self) -> Redis:
        """The campaign node, for reading the books."""
        return self.client(self.campaign_node)

    async def flush(self) -> None:
        for node in self.primaries:
            await self.client(node).flushdb()

    async def commands(self) -> Counter[str]:
        """Calls of each command so far, summed over the primaries (INFO commandstats:
        commands a script ran count too). INFO itself is left out: the bench asks it."""
        total: Counter[str] = Counter()
        for node in self.primaries:
            total.update(_calls(await self.client(node).info("commandstats")))
        total.pop("info", None)
        return total

    async def processed(self) -> tuple[int, Counter[str]]:
        """total_commands_processed, and the calls of each command, summed over the
        primaries: one INFO per node."""
        total, calls = 0, Counter[str]()
        for node in self.primaries:
            info: dict[str, Any] = await self.client(node).info("stats", "commandstats")
            total += int(info["total_commands_processed"])
            calls.update(_calls(info))
        return total, calls

    async def keys(self) -> int:
        return sum([int(await self.client(node).dbsize()) for node in self.primaries])

    async def replicas(self) -> int:
        """Replicas connected to the campaign's node."""
        info: dict[str, Any] = await self.campaign.info("replication")
        return int(info.get("connected_slaves", 0))

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _calls(info: dict[str, Any]) -> Counter[str]:
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(figures["calls"])
            for name, figures in info.items()
            if name.startswith("cmdstat_")
        }
    )


async def locate(url: str, campaign: str) -> Datastore:
    """Where ``campaign``'s keys live under ``url``, and every primary."""
    topology = topology_for(url, timeout=ASK_TIMEOUT)
    await topology.start()
    try:
        owner = topology.address(CampaignKeys(campaign).state)
        primaries = topology.primaries()
    finally:
        await topology.close()
    if owner is None or not primaries:
        raise RuntimeError(f"{url.rpartition('@')[2]}: no primary found (see the log)")
    nodes = [_node_url(topology, a) for a in primaries]
    kind = topology.options.location.kind
    shown = f"{kind}, {len(nodes)} primar{'y' if len(nodes) == 1 else 'ies'}"
    return Datastore(url, _node_url(topology, owner), tuple(nodes), shown)


async def owners(url: str, keys: Sequence[str]) -> list[str]:
    """The primary holding each of ``keys`` under ``url`` (its URL, as ``primaries``
    name it), found as flashgate finds it."""
    topology = topology_for(url, timeout=ASK_TIMEOUT)
    await topology.start()
    try:
        found = [topology.address(key) for key in keys]
        if None in found:
            raise RuntimeError(f"{url.rpartition('@')[2]}: a key's slot has no primary")
        return [_node_url(topology, address) for address in found if address is not None]
    finally:
        await topology.close()


def _node_url(topology: Topology, address: Address) -> str:
    location = topology.options.location
    if location.kind == "standalone":
        return location.url
    return location.node_url(address.host, address.port)


@contextlib.asynccontextmanager
async def opened(url: str, campaign: str) -> AsyncIterator[Datastore]:
    store = await locate(url, campaign)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def embedded(campaign: str) -> AsyncIterator[Datastore]:
    """A private redis-server, for as long as the bench runs."""
    with EmbeddedRedis() as server:
        async with opened(server.url, campaign) as store:
            store.description = "embedded redis-server"
            yield store


@contextlib.asynccontextmanager
async def sentinel(campaign: str) -> AsyncIterator[Datastore]:
    """A Sentinel topology of the bench's own: one primary, two replicas, three
    sentinels (started here, in the main thread, as gateway/embedded/topology.py asks)."""
    with SentinelTopology() as topology:
        async with opened(topology.url, campaign) as store:
            store.description = "the bench's Sentinel topology: a primary, two replicas"
            yield store


@contextlib.asynccontextmanager
async def cluster(campaign: str) -> AsyncIterator[Datastore]:
    """A Redis Cluster of the bench's own: three primaries, no replicas (started here,
    in the main thread, as gateway/embedded/topology.py asks)."""
    with ClusterTopology(primaries=3, replicas_per_primary=0) as topology:
        async with opened(topology.url, campaign) as store:
            store.description = "the bench's Redis Cluster: 3 primaries on loopback"
            yield store


async def require_empty(store: Datastore) -> None:
    """A Redis given with --redis is flushed between runs: refuse one holding data."""
    held = await store.keys()
    if held:
        raise RuntimeError(
            f"{store.url.rpartition('@')[2]} holds {held} keys; the bench flushes its "
            "database between runs: give it an empty one (FLUSHDB it yourself if it only "
            "holds an earlier bench's keys)"
        )


async def require_replicas(store: Datastore) -> None:
    if await store.replicas() < 1:
        raise RuntimeError(
            f"{store.url.rpartition('@')[2]}: the replicas scenario needs a primary with "
            "replicas (wait_for_replicas: 1 waits for one)"
        )
