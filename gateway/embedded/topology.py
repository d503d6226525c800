"""Real Redis Sentinel and Cluster topologies on loopback, for the tests, the demo and the bench.

Why real servers: failover, ASK/MOVED redirections and half-migrated slots are where a
flash sale oversells, and no fake reproduces them faithfully. Each topology is a context
manager that starts its redis-server processes (``EmbeddedRedis``), waits until they agree
with each other, and stops every one of them by PID on the way out, also when starting
fails halfway. Timings are shortened (a node is down after about a second) so that a
failover completes in a few seconds.

Start and restart nodes from a thread that outlives the topology (the main thread, say, not
an ``asyncio.to_thread`` worker): a server gets SIGTERM when the thread that started it
ends, so that no redis-server outlives a killed test run.

Imports only the stdlib, redis-py and ``gateway.embedded.server``.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import redis
from redis.crc import key_slot

from gateway.embedded.server import (
    EmbeddedRedis,
    EmbeddedRedisError,
    die_with_parent,
    find_redis_server,
    free_port,
)

HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
_BUS_OFFSET = 10000
_PORT_ATTEMPTS = 5
_POLL_INTERVAL = 0.05
_SETTLE_TIMEOUT = 30.0
_MIGRATE_TIMEOUT_MS = 5000
_T = TypeVar("_T")


class TopologyError(EmbeddedRedisError):
    """A topology did not come up or did not settle in time."""


# --- small helpers ------------------------------------------------------------------------


def _command(client: redis.Redis, *args: Any) -> Any:
    """A raw command: no redis-py reply callback, so the reply is Redis's own shape."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


@contextmanager
def _connect(port: int, password: str | None, *, decode: bool = True) -> Iterator[redis.Redis]:
    """A short-lived RESP2 client (replies of one known shape, whatever redis-py defaults to):
    topologies poll nodes that may be dead, so nothing is kept open."""
    client = redis.Redis(
        host=HOST,
        port=port,
        password=password,
        decode_responses=decode,
        protocol=2,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
    )
    try:
        yield client
    finally:
        client.close()


def _poll(check: Callable[[], _T | None], within: float, what: str) -> _T:
    """Call ``check`` until it returns something other than None; Redis errors mean 'not yet'."""
    deadline = time.monotonic() + within
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError) as error:
            result, last_error = None, error
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TopologyError(f"{what}: not within {within:g}s{detail}")
        time.sleep(_POLL_INTERVAL)


def _fields(text: str) -> dict[str, str]:
    """``key:value`` lines of INFO or CLUSTER INFO."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A RESP2 flat ``[key, value, key, value, ...]`` list, as SENTINEL REPLICAS answers."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _is_running(server: EmbeddedRedis) -> bool:
    return server.process is not None and server.process.poll() is None


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _role(port: int, password: str | None) -> tuple[str, int | None]:
    """``("master", None)`` or ``("slave", <its primary's port>)``, from ROLE."""
    with _connect(port, password) as client:
        reply = _command(client, "ROLE")
    if reply[0] == "slave":
        return "slave", int(reply[2])
    return str(reply[0]), None


def _in_sync_with(port: int, password: str | None, primary_port: int) -> bool:
    """Whether the replica on ``port`` has a live, finished link to ``primary_port``."""
    with _connect(port, password) as client:
        info = client.info("replication")
    return (
        info.get("role") == "slave"
        and int(info.get("master_port", 0)) == primary_port
        and info.get("master_link_status") == "up"
        and int(info.get("master_sync_in_progress", 1)) == 0
    )


def _userinfo(password: str | None) -> str:
    return f"default:{quote(password, safe='')}@" if password else ""


# --- the part both topologies share ---------------------------------------------------------


class _Topology:
    """Owns a temp directory and every process started in it; stops them all by PID."""

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.started_pids: list[int] = []
        self._servers: dict[int, EmbeddedRedis] = {}
        self._closed = False

    def server(self, port: int) -> EmbeddedRedis:
        """The process behind ``port`` (a killed one too, so that it can be restarted)."""
        try:
            return self._servers[port]
        except KeyError:
            raise KeyError(f"no node of this topology listens on port {port}") from None

    def start(self) -> Self:
        raise NotImplementedError

    def _launch(self, build: Callable[[int], EmbeddedRedis], pick_port: Callable[[], int]) -> int:
        """Start a server on a fresh port, trying another if the chosen one was taken meanwhile.

        The port is free when picked but someone else (another test run) may bind it before
        redis-server does; only that failure is retried.
        """
        for attempt in range(_PORT_ATTEMPTS):
            server = build(pick_port())
            try:
                self._start_tracked(server)
            except EmbeddedRedisError as error:
                if "in use" not in str(error) or attempt == _PORT_ATTEMPTS - 1:
                    raise
                continue
            self._servers[server.port] = server
            return server.port
        raise AssertionError("unreachable")

    def _start_tracked(self, server: EmbeddedRedis) -> None:
        """Start ``server``, recording its PID, and leave nothing behind if it fails."""
        try:
            server.start()
        except BaseException:
            if server.process is not None:
                self.started_pids.append(server.process.pid)
            server.stop()
            raise
        assert server.pid is not None
        self.started_pids.append(server.pid)

    def _restart_process(self, port: int) -> EmbeddedRedis:
        server = self.server(port)
        if _is_running(server):
            raise TopologyError(f"the node on port {port} is running: kill it first")
        self._start_tracked(server)
        return server

    def _kill(self, port: int) -> None:
        server = self.server(port)
        if not _is_running(server):
            raise TopologyError(f"the node on port {port} is not running")
        server.kill()

    def _running(self, ports: Iterable[int]) -> list[int]:
        return [port for port in ports if _is_running(self._servers[port])]

    def close(self) -> None:
        """SIGTERM every process at once (a quick, parallel shutdown), then reap each by PID."""
        if self._closed:
            return
        self._closed = True
        servers = list(self._servers.values())
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.process.terminate()
        for server in servers:
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _data_node_args(password: str | None) -> tuple[str, ...]:
    """Options every data node gets: an immediate full sync, and auth both ways if asked."""
    args: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")
    if password:
        args += ("--requirepass", password, "--masterauth", password)
    return args


# --- Sentinel -----------------------------------------------------------------------------------


class _SentinelServer(EmbeddedRedis):
    """``redis-server <conf> --sentinel``: Sentinel reads (and rewrites) its own config file."""

    def __init__(self, *, port: int, data_dir: Path, config: str) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self.config_file = data_dir / "sentinel.conf"
        self.config_file.write_text(config)

    def command(self) -> list[str]:
        return [str(find_redis_server()), str(self.config_file), "--sentinel"]


class SentinelTopology(_Topology):
    """One primary, ``replicas`` replicas and ``sentinels`` Sentinels watching them.

    ``password`` protects the data nodes (Sentinel gets it as auth-pass); ``sentinel_password``
    protects the Sentinels themselves.
    """

    def __init__(
        self,
        replicas: int = 2,
        sentinels: int = 3,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        master_name: str = "flashgate",
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        if replicas < 0 or sentinels < 1:
            raise ValueError("need replicas >= 0 and sentinels >= 1")
        super().__init__("flashgate-sentinel-")
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.quorum = sentinels // 2 + 1
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{_userinfo(self.password)}{hosts}/{self.master_name}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.sentinel_ports]

    def start(self) -> Self:
        primary = self._start_data_node(replica_of=None)
        for _ in range(self.replica_count):
            self._start_data_node(replica_of=primary)
        # Replicas in sync before the Sentinels start: their first INFO of the primary then
        # lists every replica, instead of 10 s later.
        for port in self.data_ports[1:]:
            self._wait_in_sync(port, primary)
        for _ in range(self.sentinel_count):
            self.sentinel_ports.append(self._launch(self._sentinel_server, free_port))
        _poll(lambda: self._sentinels_agree(primary), _SETTLE_TIMEOUT, "sentinels to agree")
        return self

    def primary(self) -> EmbeddedRedis:
        """The primary most running Sentinels report (they may briefly differ in a failover)."""
        answers = collections.Counter(
            self._reported_primary(port) for port in self._running(self.sentinel_ports)
        )
        if not answers:
            raise TopologyError("no sentinel is running")
        return self.server(answers.most_common(1)[0][0])

    def kill(self, port: int) -> None:
        """SIGKILL the node (data node or Sentinel) on ``port``: a crash, not a shutdown."""
        self._kill(port)

    def kill_primary(self) -> int:
        port = self.primary().port
        self.kill(port)
        return port

    def wait_for_failover(self, old_port: int, within: float = 30.0) -> int:
        """Until every running Sentinel names the same new primary and it says it is master."""

        def promoted() -> int | None:
            answers = {self._reported_primary(p) for p in self._running(self.sentinel_ports)}
            if len(answers) != 1:
                return None
            port = answers.pop()
            if port == old_port or _role(port, self.password)[0] != "master":
                return None
            return port

        return _poll(promoted, within, f"a failover away from port {old_port}")

    def restart(self, port: int, within: float = _SETTLE_TIMEOUT) -> EmbeddedRedis:
        """Bring a killed node back, on its port and data directory.

        A data node comes back as a replica of the current primary. It is started with
        ``--replicaof`` rather than left for Sentinel to convert: Sentinel only converts an old
        primary some 8 s after seeing it again, and meanwhile it would be an empty primary.
        """
        if port in self.sentinel_ports:
            return self._restart_process(port)
        primary = self.primary().port
        server = self.server(port)
        server.extra_args = self._node_args(replica_of=primary)
        self._restart_process(port)
        self._wait_in_sync(port, primary, within)
        _poll(lambda: self._sentinels_see_healthy(port), within, f"sentinels to see port {port}")
        return server

    def _node_args(self, replica_of: int | None) -> tuple[str, ...]:
        args = _data_node_args(self.password)
        if replica_of is not None:
            args += ("--replicaof", HOST, str(replica_of))
        return args

    def _start_data_node(self, replica_of: int | None) -> int:
        def build(port: int) -> EmbeddedRedis:
            return EmbeddedRedis(
                port=port,
                data_dir=self._node_dir(f"node-{port}"),
                extra_args=self._node_args(replica_of),
            )

        port = self._launch(build, free_port)
        self.data_ports.append(port)
        return port

    def _node_dir(self, name: str) -> Path:
        directory = self.root / name
        directory.mkdir()
        return directory

    def _sentinel_server(self, port: int) -> EmbeddedRedis:
        directory = self._node_dir(f"sentinel-{port}")
        return _SentinelServer(port=port, data_dir=directory, config=self._sentinel_config(port))

    def _sentinel_config(self, port: int) -> str:
        name = self.master_name
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {self.root / f'sentinel-{port}'}",
            f"logfile {self.root / f'sentinel-{port}' / 'redis.log'}",
            "daemonize no",
            "sentinel resolve-hostnames no",
            "sentinel announce-hostnames no",
            f"sentinel monitor {name} {HOST} {self.data_ports[0]} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            lines += [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        return "\n".join(lines) + "\n"

    def _wait_in_sync(self, port: int, primary: int, within: float = _SETTLE_TIMEOUT) -> None:
        _poll(
            lambda: _in_sync_with(port, self.password, primary) or None,
            within,
            f"replica {port} to sync with {primary}",
        )

    def _sentinel(self, port: int, *args: Any) -> Any:
        with _connect(port, self.sentinel_password) as client:
            return _command(client, "SENTINEL", *args)

    def _reported_primary(self, sentinel_port: int) -> int:
        address = self._sentinel(sentinel_port, "GET-MASTER-ADDR-BY-NAME", self.master_name)
        if not address:
            raise TopologyError(f"sentinel {sentinel_port} does not know {self.master_name!r}")
        return int(address[1])

    def _healthy_replicas(self, sentinel_port: int) -> set[int]:
        replicas = [_pairs(r) for r in self._sentinel(sentinel_port, "REPLICAS", self.master_name)]
        return {int(r["port"]) for r in replicas if set(r["flags"].split(",")) == {"slave"}}

    def _healthy_sentinels(self, sentinel_port: int) -> set[int]:
        others = [_pairs(s) for s in self._sentinel(sentinel_port, "SENTINELS", self.master_name)]
        return {int(s["port"]) for s in others if set(s["flags"].split(",")) == {"sentinel"}}

    def _sentinels_agree(self, primary: int) -> bool | None:
        """Every Sentinel sees the primary, every replica and every other Sentinel."""
        replicas = set(self.data_ports) - {primary}
        for port in self.sentinel_ports:
            if self._reported_primary(port) != primary:
                return None
            if self._healthy_replicas(port) != replicas:
                return None
            if self._healthy_sentinels(port) != set(self.sentinel_ports) - {port}:
                return None
        return True

    def _sentinels_see_healthy(self, data_port: int) -> bool | None:
        running = self._running(self.sentinel_ports)
        ok = all(data_port in self._healthy_replicas(port) for port in running)
        return ok or None


# --- Cluster ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNodeView:
    """One line of CLUSTER NODES: how one node sees another."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def healthy(self) -> bool:
        return not self.flags & {"fail", "fail?", "handshake", "noaddr"}

    @classmethod
    def parse(cls, line: str) -> ClusterNodeView:
        fields = line.split()
        address = fields[1].split(",")[0].split("@")[0]
        return cls(
            node_id=fields[0],
            port=int(address.rsplit(":", 1)[1] or 0),
            flags=frozenset(fields[2].split(",")),
            primary_id=None if fields[3] == "-" else fields[3],
            slots=tuple(_slot_range(token) for token in fields[8:] if not token.startswith("[")),
        )


def _slot_range(token: str) -> tuple[int, int]:
    first, _, last = token.partition("-")
    return int(first), int(last or first)


def _even_slot_ranges(count: int) -> list[tuple[int, int]]:
    """16384 slots cut into ``count`` contiguous ranges, as redis-cli would."""
    bounds = [i * CLUSTER_SLOTS // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count)]


SlotMap = tuple[tuple[int, int, int], ...]


def _slot_map(views: Iterable[ClusterNodeView]) -> SlotMap:
    """``(first, last, port)`` for every owned range, sorted: comparable between nodes."""
    owned = ((a, b, view.port) for view in views if view.is_primary for a, b in view.slots)
    return tuple(sorted(owned))


class ClusterTopology(_Topology):
    """A Redis Cluster: ``primaries`` primaries with ``replicas_per_primary`` replicas each.

    ``use_redis_cli``: create the cluster with ``redis-cli --cluster create`` (default: when it
    is on PATH and there are at least 3 primaries), or by hand with CLUSTER commands.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 2,
        *,
        node_timeout_ms: int = 1000,
        password: str | None = None,
        use_redis_cli: bool | None = None,
    ) -> None:
        if primaries < 1 or replicas_per_primary < 0:
            raise ValueError("need primaries >= 1 and replicas_per_primary >= 0")
        super().__init__("flashgate-cluster-")
        self.primary_count = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        if use_redis_cli is None:
            use_redis_cli = shutil.which("redis-cli") is not None and primaries >= 3
        self.use_redis_cli = use_redis_cli
        self.ports: list[int] = []
        self.seed_ports: list[int] = []
        self._ids: dict[int, str] = {}
        self._killed: dict[int, tuple[set[int], int]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.seed_ports)
        return f"redis+cluster://{_userinfo(self.password)}{hosts}"

    @property
    def nodes(self) -> list[EmbeddedRedis]:
        return [self.server(port) for port in self.ports]

    def start(self) -> Self:
        total = self.primary_count * (1 + self.replicas_per_primary)
        for _ in range(total):
            self.ports.append(self._launch(self._cluster_node, self._pick_port))
        for port in self.ports:
            with _connect(port, self.password) as client:
                self._ids[port] = str(_command(client, "CLUSTER", "MYID"))
        if self.use_redis_cli:
            self._create_with_redis_cli()
        else:
            self._create_by_hand()
        self._wait_healthy(complete=True)
        self.seed_ports = self.primaries()
        return self

    # -- what the cluster looks like

    def node_id(self, port: int) -> str:
        return self._ids[port]

    def view(self, port: int | None = None) -> list[ClusterNodeView]:
        """CLUSTER NODES as the node on ``port`` (default: any running node) sees it."""
        port = port if port is not None else self._running(self.ports)[0]
        with _connect(port, self.password) as client:
            text = str(_command(client, "CLUSTER", "NODES"))
        return [ClusterNodeView.parse(line) for line in text.splitlines() if line.strip()]

    def primaries(self) -> list[int]:
        """Ports of the primaries that own slots, in slot order."""
        owners = dict.fromkeys(port for _, _, port in _slot_map(self.view()))
        return list(owners)

    def replicas_of(self, port: int) -> list[int]:
        node_id = self._ids[port]
        return sorted(v.port for v in self.view() if v.primary_id == node_id)

    def primary_for_slot(self, slot: int) -> int:
        for first, last, port in _slot_map(self.view()):
            if first <= slot <= last:
                return port
        raise TopologyError(f"no node owns slot {slot}")

    def primary_for_key(self, key: str | bytes) -> int:
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    # -- failures

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``; remembers its replicas and a slot, for the failover."""
        view = self.view()
        me = next(v for v in view if v.port == port)
        if me.slots:
            replicas = {v.port for v in view if v.primary_id == me.node_id}
            self._killed[port] = (replicas, me.slots[0][0])
        self._kill(port)

    def wait_for_failover(self, old_port: int, within: float = 30.0) -> int:
        """Until a replica of the killed primary owns its slots and every node says ok."""
        if old_port not in self._killed:
            raise TopologyError(f"port {old_port} was not a primary killed with kill()")
        replicas, slot = self._killed[old_port]

        def promoted() -> int | None:
            if not self._healthy():
                return None
            owner = self.primary_for_slot(slot)
            if owner not in replicas or _role(owner, self.password)[0] != "master":
                return None
            return owner

        return _poll(promoted, within, f"a failover away from port {old_port}")

    def restart(self, port: int, within: float = _SETTLE_TIMEOUT) -> EmbeddedRedis:
        """Bring a killed node back on its port and nodes.conf; a replaced primary rejoins as
        a replica of its successor. Returns when the whole cluster is healthy again."""
        server = self._restart_process(port)
        self._killed.pop(port, None)
        # With every node back, wait for the planned shape too: a replaced primary is first a
        # primary without slots, and only then a replica.
        complete = len(self._running(self.ports)) == len(self.ports)
        self._wait_healthy(complete=complete, within=within)
        return server

    # -- resharding

    def migrate_slot(
        self,
        slot: int,
        target_port: int,
        *,
        pause_between_keys: float = 0,
        batch_size: int = 10,
    ) -> None:
        """Move ``slot`` and its keys online, the way redis-cli reshards.

        ``pause_between_keys`` sleeps between batches, to leave the slot half migrated
        (moved keys answer ASK) long enough for a test to run traffic against it.
        """
        self.begin_migration(slot, target_port)
        self.finish_migration(
            slot, target_port, pause_between_keys=pause_between_keys, batch_size=batch_size
        )

    def begin_migration(self, slot: int, target_port: int) -> int:
        """IMPORTING on the target, then MIGRATING on the source (in that order, so the source
        never sends ASK to a node not ready for it). Returns the source's port."""
        source = self.primary_for_slot(slot)
        if source == target_port:
            raise TopologyError(f"port {target_port} already owns slot {slot}")
        if target_port not in self.primaries():
            raise TopologyError(f"port {target_port} is not a primary owning slots")
        self._cluster(target_port, "SETSLOT", slot, "IMPORTING", self._ids[source])
        self._cluster(source, "SETSLOT", slot, "MIGRATING", self._ids[target_port])
        return source

    def move_keys(
        self,
        slot: int,
        target_port: int,
        count: int | None = None,
        *,
        pause_between_keys: float = 0,
        batch_size: int = 10,
    ) -> int:
        """MIGRATE up to ``count`` (default: all) keys of a slot begun with begin_migration."""
        source = self.primary_for_slot(slot)
        moved = 0
        while count is None or moved < count:
            wanted = batch_size if count is None else min(batch_size, count - moved)
            keys = self._keys_in_slot(source, slot, wanted)
            if not keys:
                break
            self._migrate(source, target_port, keys)
            moved += len(keys)
            if pause_between_keys:
                time.sleep(pause_between_keys)
        return moved

    def finish_migration(
        self,
        slot: int,
        target_port: int,
        *,
        pause_between_keys: float = 0,
        batch_size: int = 10,
    ) -> None:
        """Move the keys left, then give the slot to the target: target first, then the source,
        then every other primary; returns once every node agrees."""
        source = self.primary_for_slot(slot)
        self.move_keys(
            slot, target_port, pause_between_keys=pause_between_keys, batch_size=batch_size
        )
        others = [p for p in self.primaries() if p not in (source, target_port)]
        for port in [target_port, source, *others]:
            self._cluster(port, "SETSLOT", slot, "NODE", self._ids[target_port])
        _poll(
            lambda: (self._healthy() and self.primary_for_slot(slot) == target_port) or None,
            _SETTLE_TIMEOUT,
            f"every node to agree that {target_port} owns slot {slot}",
        )

    # -- internals

    def _pick_port(self) -> int:
        """A free port whose cluster bus port (+10000) is free too and clashes with no node's."""
        taken = {p for port in self.ports for p in (port, port + _BUS_OFFSET)}
        while True:
            port = free_port()
            bus = port + _BUS_OFFSET
            if bus > 65535 or port in taken or bus in taken:
                continue
            if _port_is_free(bus):
                return port

    def _cluster_node(self, port: int) -> EmbeddedRedis:
        directory = self.root / f"node-{port}"
        directory.mkdir()
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(directory / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # The other shards keep serving while one fails over (as flashgate advises
            # operators: docs/operations.md): their campaigns are never disturbed.
            "--cluster-require-full-coverage",
            "no",
            "--cluster-allow-reads-when-down",
            "no",
            # A replica may take over however long it was cut off: tests kill nodes at will.
            "--cluster-replica-validity-factor",
            "0",
            *_data_node_args(self.password),
        )
        return EmbeddedRedis(port=port, data_dir=directory, extra_args=args)

    def _cluster(self, port: int, *args: Any) -> Any:
        with _connect(port, self.password) as client:
            return _command(client, "CLUSTER", *args)

    def _create_with_redis_cli(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise TopologyError("redis-cli is not on PATH")
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password
        command = [cli, "--cluster", "create", *(f"{HOST}:{port}" for port in self.ports)]
        command += ["--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=_SETTLE_TIMEOUT * 2,
            check=False,
            preexec_fn=die_with_parent if os.name == "posix" else None,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise TopologyError(f"redis-cli --cluster create failed: {output[-2000:]}")

    def _create_by_hand(self) -> None:
        """What redis-cli does: slots, distinct epochs, MEET, then REPLICATE."""
        primaries = self.ports[: self.primary_count]
        for epoch, (port, (first, last)) in enumerate(
            zip(primaries, _even_slot_ranges(self.primary_count), strict=True), start=1
        ):
            self._add_slots(port, first, last)
            self._cluster(port, "SET-CONFIG-EPOCH", epoch)
        for port in self.ports[1:]:
            self._cluster(self.ports[0], "MEET", HOST, port)
        _poll(self._everyone_met, _SETTLE_TIMEOUT, "every node to meet every other")
        replicas = self.ports[self.primary_count :]
        for index, port in enumerate(replicas):
            self._replicate(port, primaries[index % self.primary_count])

    def _add_slots(self, port: int, first: int, last: int) -> None:
        try:
            self._cluster(port, "ADDSLOTSRANGE", first, last)
        except redis.ResponseError:  # before Redis 7.0: the slots one by one
            self._cluster(port, "ADDSLOTS", *range(first, last + 1))

    def _everyone_met(self) -> bool | None:
        expected = set(self.ports)
        for port in self.ports:
            view = self.view(port)
            if {v.port for v in view if v.healthy} != expected:
                return None
        return True

    def _replicate(self, port: int, primary: int) -> None:
        """CLUSTER REPLICATE, retried: it fails until the replica has learnt the primary's id
        by gossip."""

        def replicate() -> bool:
            self._cluster(port, "REPLICATE", self._ids[primary])
            return True

        _poll(replicate, _SETTLE_TIMEOUT, f"node {port} to replicate {primary}")

    def _wait_healthy(self, *, complete: bool, within: float = _SETTLE_TIMEOUT) -> None:
        _poll(
            lambda: self._healthy(complete=complete) or None,
            within,
            "the cluster to be ok on every node",
        )

    def _healthy(self, *, complete: bool = False) -> bool:
        """Every running node says ok, sees every running node healthy, and has the same full
        slot map; every running replica is in sync. ``complete``: the planned primaries and
        replicas are all there."""
        running = self._running(self.ports)
        maps: set[SlotMap] = set()
        for port in running:
            if not self._node_is_healthy(port, set(running), maps):
                return False
        if len(maps) != 1 or sum(b - a + 1 for a, b, _ in next(iter(maps))) != CLUSTER_SLOTS:
            return False
        return not complete or self._is_complete(running)

    def _node_is_healthy(self, port: int, running: set[int], maps: set[SlotMap]) -> bool:
        info = _fields(str(self._cluster(port, "INFO")))
        if info.get("cluster_state") != "ok":
            return False
        view = self.view(port)
        if not running <= {v.port for v in view if v.healthy}:
            return False
        maps.add(_slot_map(view))
        me = next(v for v in view if "myself" in v.flags)
        if me.primary_id is None:
            return True
        primary = next((v.port for v in view if v.node_id == me.primary_id), 0)
        return _in_sync_with(port, self.password, primary)

    def _is_complete(self, running: list[int]) -> bool:
        view = self.view()
        owners = {v.node_id for v in view if v.is_primary and v.slots}
        replicas = [v for v in view if v.primary_id in owners]
        return (
            len(running) == len(self.ports)
            and len(owners) == self.primary_count
            and len(replicas) == self.primary_count * self.replicas_per_primary
        )

    def _keys_in_slot(self, port: int, slot: int, count: int) -> list[bytes]:
        with _connect(port, self.password, decode=False) as client:
            return list(_command(client, "CLUSTER", "GETKEYSINSLOT", slot, count))

    def _migrate(self, source: int, target: int, keys: list[bytes]) -> None:
        auth = ("AUTH", self.password) if self.password else ()
        with _connect(source, self.password, decode=False) as client:
            _command(
                client, "MIGRATE", HOST, target, "", 0, _MIGRATE_TIMEOUT_MS, *auth, "KEYS", *keys
            )
