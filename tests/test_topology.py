"""The Sentinel and Cluster topologies: real servers, driven through redis-py's own clients.

What the other tests build on: failover keeps acknowledged writes, a migrating slot keeps
answering (ASK), and nothing started outlives ``close()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError
from redis.sentinel import Sentinel

from gateway.embedded.server import EmbeddedRedisError
from gateway.embedded.topology import HOST, ClusterTopology, SentinelTopology

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alive(pid: int) -> bool:
    """A redis-server still runs with this PID (a zombie or a reused PID does not count)."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _assert_closed_cleanly(topology: SentinelTopology | ClusterTopology) -> None:
    pids = list(topology.started_pids)
    topology.close()
    assert pids
    assert [pid for pid in pids if _alive(pid)] == []
    assert not topology.root.exists()


def _hosts(url: str) -> list[tuple[str, int]]:
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    return [(host, int(port)) for host, _, port in (a.rpartition(":") for a in netloc.split(","))]


def _cluster_client(topology: ClusterTopology, password: str | None = None) -> RedisCluster:
    """redis-py's own cluster client, seeded from the topology's URL."""
    nodes = [ClusterNode(host, port) for host, port in _hosts(topology.url)]  # type: ignore[no-untyped-call]
    return RedisCluster(startup_nodes=nodes, password=password, decode_responses=True)


def _sentinel(topology: SentinelTopology, **options: Any) -> Sentinel:
    """redis-py's own Sentinel client of the topology's Sentinels."""
    return Sentinel(topology.sentinel_addresses, **options)  # type: ignore[no-untyped-call]


def _node(port: int, password: str | None = None, *, decode: bool = False) -> redis.Redis:
    """A plain client of one node, bypassing Sentinel and cluster routing."""
    return redis.Redis(port=port, password=password, socket_timeout=2, decode_responses=decode)


def _raw(node: redis.Redis, *args: Any) -> Any:
    return node.execute_command(*args)  # type: ignore[no-untyped-call]


def _write_acknowledged(client: redis.Redis, key: str, value: str, replicas: int) -> None:
    """SET then WAIT on one connection (a pipeline): WAIT counts only this connection's writes."""
    pipe = client.pipeline(transaction=False)
    pipe.set(key, value)
    pipe.wait(replicas, 5000)
    assert pipe.execute() == [True, replicas]


# --- Sentinel -----------------------------------------------------------------------------------


def test_sentinel_clients_find_the_primary_and_replicas(
    sentinel_topology: SentinelTopology,
) -> None:
    topology = sentinel_topology
    assert topology.url.startswith(f"redis+sentinel://{HOST}:")
    assert topology.url.endswith("/flashgate")
    assert _hosts(topology.url) == topology.sentinel_addresses
    primary = topology.primary().port
    with _sentinel(topology, socket_timeout=2) as sentinel:
        assert sentinel.discover_master("flashgate") == (HOST, primary)
        replicas = {port for _, port in sentinel.discover_slaves("flashgate")}
        assert replicas == set(topology.data_ports) - {primary}
        master = sentinel.master_for("flashgate", socket_timeout=2, decode_responses=True)
        replica = sentinel.slave_for("flashgate", socket_timeout=2, decode_responses=True)
        try:
            _write_acknowledged(master, "topology:greeting", "hello", replicas=2)
            assert replica.get("topology:greeting") == "hello"
        finally:
            master.close()
            replica.close()


def test_sentinel_failover_keeps_acknowledged_writes_and_the_old_primary_rejoins(
    fresh_sentinel: Callable[..., SentinelTopology],
) -> None:
    """WAIT for *every* replica: Sentinel picks the new primary by replication offsets it may
    have read seconds ago, so a write only one replica had could be lost with the other."""
    topology = fresh_sentinel(password="data-secret", sentinel_password="watch-secret")
    assert "://default:data-secret@" in topology.url
    options: dict[str, Any] = {"password": "data-secret", "socket_timeout": 2}
    with _sentinel(
        topology, sentinel_kwargs={"password": "watch-secret", "socket_timeout": 2}, **options
    ) as sentinel:
        master = sentinel.master_for("flashgate", decode_responses=True, **options)
        try:
            _write_acknowledged(master, "order:1", "paid", replicas=2)
            old = topology.kill_primary()
            new = topology.wait_for_failover(old, within=30)
            assert new != old
            assert sentinel.discover_master("flashgate") == (HOST, new)
            assert master.get("order:1") == "paid"
        finally:
            master.close()
    with _node(new) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    topology.restart(old)
    with _node(old, "data-secret") as rejoined:
        role = _raw(rejoined, "ROLE")
        assert (role[0], int(role[2])) == (b"slave", new)
        assert rejoined.get("order:1") == b"paid"
    _assert_closed_cleanly(topology)


def test_a_topology_failing_halfway_leaves_no_process() -> None:
    """A master name Sentinel rejects: the data nodes were already up and must go too."""
    topology = SentinelTopology(replicas=1, sentinels=1, master_name="two words")
    with pytest.raises(EmbeddedRedisError), topology:
        pytest.fail("started with a bad master name")
    assert len(topology.started_pids) == 3
    assert [pid for pid in topology.started_pids if _alive(pid)] == []
    assert not topology.root.exists()


# --- Cluster ------------------------------------------------------------------------------------


def test_cluster_clients_see_the_same_slot_owners(cluster_topology: ClusterTopology) -> None:
    topology = cluster_topology
    assert topology.url.startswith(f"redis+cluster://{HOST}:")
    assert [port for _, port in _hosts(topology.url)] == topology.primaries()
    assert len(topology.nodes) == 9
    assert all(len(topology.replicas_of(port)) == 2 for port in topology.primaries())
    client = _cluster_client(topology)
    try:
        keys = [f"stock:{n}" for n in range(30)]
        for key in keys:
            client.set(key, key.upper())
        assert [client.get(key) for key in keys] == [key.upper() for key in keys]
        owners = {topology.primary_for_key(key) for key in keys}
        assert owners == set(topology.primaries())
        for key in keys[:5]:
            node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
            assert node.port == topology.primary_for_key(key)
    finally:
        client.close()


def _slot_with_keys(client: RedisCluster, tag: str, count: int) -> tuple[int, list[str]]:
    keys = [f"{{{tag}}}:{n}" for n in range(count)]
    for key in keys:
        client.set(key, key)
    return key_slot(keys[0].encode()), keys


def _count_keys(port: int, slot: int, password: str | None = None) -> int:
    with _node(port, password) as node:
        return int(_raw(node, "CLUSTER", "COUNTKEYSINSLOT", slot))


def test_migrating_a_slot_under_traffic_moves_every_key(cluster_topology: ClusterTopology) -> None:
    topology = cluster_topology
    client = _cluster_client(topology)
    try:
        slot, keys = _slot_with_keys(client, "sale", 40)
        source = topology.primary_for_slot(slot)
        target = next(port for port in topology.primaries() if port != source)
        increments = 0
        with ThreadPoolExecutor(max_workers=1) as pool:
            migration = pool.submit(
                topology.migrate_slot, slot, target, pause_between_keys=0.02, batch_size=4
            )
            while not migration.done():
                client.incr("{sale}:sold")
                increments += 1
                assert client.get(keys[increments % len(keys)]) == keys[increments % len(keys)]
            migration.result()
        assert increments > 0
        assert topology.primary_for_slot(slot) == target
        assert (_count_keys(target, slot), _count_keys(source, slot)) == (41, 0)
        assert [client.get(key) for key in keys] == keys
        assert client.get("{sale}:sold") == str(increments)
        topology.migrate_slot(slot, source)
    finally:
        client.close()


def test_a_half_migrated_slot_answers_ask_for_moved_keys(
    cluster_topology: ClusterTopology,
) -> None:
    topology = cluster_topology
    client = _cluster_client(topology)
    try:
        slot, keys = _slot_with_keys(client, "hold", 10)
        target = next(p for p in topology.primaries() if p != topology.primary_for_slot(slot))
        source = topology.begin_migration(slot, target)
        assert topology.move_keys(slot, target, count=4) == 4
        redirects: list[int] = []
        with _node(source, decode=True) as direct:
            for key in keys:
                try:
                    assert direct.get(key) == key
                except AskError as redirect:
                    redirects.append(redirect.port)
        assert redirects == [target] * 4
        with _node(target) as direct, pytest.raises(MovedError):
            direct.get(keys[0])  # without ASKING, the target does not serve the slot yet
        assert [client.get(key) for key in keys] == keys
        client.set("{hold}:new", "during")
        assert _count_keys(target, slot) == 5
        topology.finish_migration(slot, target)
        assert topology.primary_for_slot(slot) == target
        assert _count_keys(target, slot) == 11
        assert [client.get(key) for key in [*keys, "{hold}:new"]] == [*keys, "during"]
        topology.migrate_slot(slot, source)
    finally:
        client.close()


def test_cluster_made_by_hand_fails_over_and_takes_the_old_primary_back(
    fresh_cluster: Callable[..., ClusterTopology],
) -> None:
    """Created with CLUSTER commands (not redis-cli), with a password: MIGRATE must AUTH."""
    started = time.monotonic()
    topology = fresh_cluster(
        primaries=3, replicas_per_primary=1, password="pw", use_redis_cli=False
    )
    assert "://default:pw@" in topology.url
    assert time.monotonic() - started < 20
    client = _cluster_client(topology, password="pw")
    try:
        slot, keys = _slot_with_keys(client, "auth", 3)
        target = next(p for p in topology.primaries() if p != topology.primary_for_slot(slot))
        topology.migrate_slot(slot, target)
        assert _count_keys(target, slot, password="pw") == 3

        old = topology.primary_for_key("order:7")
        (replica,) = topology.replicas_of(old)
        with _node(old, "pw") as primary:
            _write_acknowledged(primary, "order:7", "paid", replicas=1)
        topology.kill(old)
        assert topology.wait_for_failover(old, within=30) == replica
    finally:
        client.close()
    after = _cluster_client(topology, password="pw")
    try:
        assert after.get("order:7") == "paid"
        assert [after.get(key) for key in keys] == keys
    finally:
        after.close()
    topology.restart(old)
    assert topology.replicas_of(replica) == [old]
    _assert_closed_cleanly(topology)
