"""Where a command goes: the one server, the primary the sentinels name, or the
cluster node that owns the key's slot.

Redis Sentinel and Redis Cluster are the distributed engine flashgate runs on when
one Redis is not enough; this module only follows what they decide:

* ``SentinelPrimary`` asks the sentinels for the primary of a service, checks the
  answer with ROLE, follows ``+switch-master`` as the sentinels publish it, and asks
  again whenever a connection to the primary failed or a write was answered
  READONLY (the caller reports that with ``failed``).
* ``ClusterSlots`` keeps the slot map (CLUSTER SLOTS), updates one slot at a MOVED
  redirection and reads the whole map again after one, after a connection failure
  and every ``CLUSTER_REFRESH`` seconds.

Resolving never blocks a command: while the primary (or a slot's owner) is not
known, ``address`` returns None and the caller fails closed at once; the answer is
being fetched meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError

from gateway.config.redis_url import RedisLocation, parse_redis_url
from limiter.logs import Throttled

log = logging.getLogger(__name__)
_trouble = Throttled(log, every=10.0)

#: After a failure, ask the sentinels (or read the slot map) again at most this often.
RETRY_SECONDS = 0.1
#: How often the slot map is read again while nothing is wrong.
CLUSTER_REFRESH = 10.0


class Address(NamedTuple):
    """A data node: host and port, or (port 0) a unix socket at ``host``."""

    host: str
    port: int

    def __str__(self) -> str:
        return self.host if self.port == 0 else f"{self.host}:{self.port}"


class NodeOptions:
    """How to reach a data node: TLS, AUTH and database, as redis-py reads the URL."""

    def __init__(self, location: RedisLocation, timeout: float) -> None:
        self.location = location
        self.timeout = timeout
        options: dict[str, Any] = dict(parse_url(location.node_url("placeholder", 6379)))
        options.pop("host", None)
        options.pop("port", None)
        self.unix_path: str | None = options.pop("path", None)
        options.pop("connection_class", None)  # TLS: ``location.tls``
        #: What redis-py's own clients of a node are given besides host and port.
        self.client_options = options
        if location.tls:
            self.client_options["ssl"] = True

    def client(self, address: Address) -> Redis:
        """A redis-py client of one node, for the rare commands off the hot path."""
        options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "protocol": 2,
        }
        if address.port == 0:
            plain = {k: v for k, v in self.client_options.items() if not k.startswith("ssl")}
            return Redis(unix_socket_path=address.host, **options, **plain)
        return Redis(host=address.host, port=address.port, **options, **self.client_options)


class Topology:
    """One server: every command goes to it."""

    #: Keys of different campaigns may live on different nodes (a Redis Cluster).
    sharded = False

    def __init__(self, options: NodeOptions, address: Address) -> None:
        self.options = options
        self._address = address

    def address(self, key: str | bytes | None) -> Address | None:
        """Where a command on ``key`` goes now (None: not known yet, being asked)."""
        return self._address

    def primaries(self) -> list[Address]:
        """Every primary known now (scripts are loaded on each)."""
        return [self._address]

    def failed(self, address: Address) -> None:
        """A connection to ``address`` failed, or it refused writes (READONLY)."""

    def moved(self, slot: int, address: Address) -> None:
        """Redis said MOVED: ``slot`` is served by ``address`` now."""

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the primary or the slot map changes."""

    async def start(self) -> None:
        """Begin following changes (a failed start is retried, never raised)."""

    async def close(self) -> None:
        """Stop following changes."""


class _Follower(Topology):
    """What Sentinel and Cluster share: a background refresh, rate-limited."""

    def __init__(self, options: NodeOptions) -> None:
        super().__init__(options, Address("", 0))
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = float("-inf")
        self._listeners: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def refresh_soon(self) -> None:
        """Ask again, unless asking already (or asked a moment ago: then a little later)."""
        if self._refreshing is not None and not self._refreshing.done():
            return
        wait = self._last_refresh + RETRY_SECONDS - time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_after(wait))

    async def _refresh_after(self, wait: float) -> None:
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_refresh = time.monotonic()
        try:
            await self.refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            _trouble.log(logging.WARNING, "refresh", "redis topology unknown: %s", exc)

    async def refresh(self) -> None:
        raise NotImplementedError

    def failed(self, address: Address) -> None:
        self.refresh_soon()

    async def start(self) -> None:
        """Ask once now (a failure is logged and asked again when a command needs it)."""
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_after(0))
        await asyncio.wait([self._refreshing], timeout=self.options.timeout * 4)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._refreshing] if self._refreshing else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _ask(self, address: Address, *command: Any) -> Any:
        client = self.options.client(address)
        try:
            return await client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()


class SentinelPrimary(_Follower):
    """The primary of a Sentinel service, as the sentinels name it and ROLE confirms."""

    def __init__(
        self, options: NodeOptions, sentinels: Sequence[Address], service: str, password: str | None
    ) -> None:
        super().__init__(options)
        self.sentinels = list(sentinels)
        self.service = service
        self.sentinel_password = password
        self._current: Address | None = None

    def address(self, key: str | bytes | None) -> Address | None:
        if self._current is None:
            self.refresh_soon()
        return self._current

    def primaries(self) -> list[Address]:
        return [self._current] if self._current else []

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._follow_switches()))

    async def refresh(self) -> None:
        """Ask each sentinel in turn; take the first answer ROLE confirms."""
        for sentinel in list(self.sentinels):
            try:
                named = await self._named_by(sentinel)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("sentinel %s did not answer: %s", sentinel, exc)
                continue
            if named is not None and await self._is_primary(named):
                self._settle(named, f"sentinel {sentinel}")
                self.sentinels.remove(sentinel)  # the one that answered is asked first
                self.sentinels.insert(0, sentinel)
                return
        raise RedisError(f"no sentinel names a confirmed primary for {self.service!r}")

    async def _named_by(self, sentinel: Address) -> Address | None:
        client = self._sentinel_client(sentinel)
        try:
            reply = await client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )
        finally:
            await client.aclose()
        if not reply:
            return None
        host, port = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
        return Address(host, int(port))

    async def _is_primary(self, address: Address) -> bool:
        try:
            role = await self._ask(address, "ROLE")
        except (RedisError, OSError, TimeoutError):
            return False
        return bool(role) and role[0] in (b"master", "master")

    def _settle(self, address: Address, source: str) -> None:
        if address != self._current:
            level = logging.INFO if self._current is None else logging.WARNING
            log.log(level, "redis primary of %s is now %s (%s)", self.service, address, source)
            self._current = address
            self._changed()

    def _sentinel_client(self, sentinel: Address) -> Redis:
        tls = {k: v for k, v in self.options.client_options.items() if k.startswith("ssl")}
        return Redis(
            host=sentinel.host,
            port=sentinel.port,
            password=self.sentinel_password,
            socket_timeout=self.options.timeout,
            socket_connect_timeout=self.options.timeout,
            protocol=2,
            **tls,
        )

    async def _follow_switches(self) -> None:
        """Listen for ``+switch-master`` on one sentinel after another (the first to
        publish it wins; the ROLE check in refresh() confirms it)."""
        turn = 0
        while True:
            sentinel = self.sentinels[turn % len(self.sentinels)]
            turn += 1
            client = self._sentinel_client(sentinel)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe("+switch-master")
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._switched(message["data"])
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("sentinel %s: +switch-master listener: %s", sentinel, exc)
                await asyncio.sleep(RETRY_SECONDS)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    def _switched(self, data: bytes) -> None:
        parts = data.decode(errors="replace").split()
        if len(parts) == 5 and parts[0] == self.service and parts[4].isdigit():
            self._settle(Address(parts[3], int(parts[4])), "+switch-master")
            self.refresh_soon()  # and confirm it with ROLE


class ClusterSlots(_Follower):
    """A Redis Cluster's slot map: which primary serves each of the 16384 slots."""

    sharded = True

    def __init__(self, options: NodeOptions, seeds: Sequence[Address]) -> None:
        super().__init__(options)
        self.seeds = list(seeds)
        self._slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS

    def address(self, key: str | bytes | None) -> Address | None:
        slot = 0 if key is None else key_slot(key.encode() if isinstance(key, str) else key)
        owner = self._slots[slot]
        if owner is None:
            self.refresh_soon()
        return owner

    def primaries(self) -> list[Address]:
        return sorted({a for a in self._slots if a is not None})

    def moved(self, slot: int, address: Address) -> None:
        if self._slots[slot] != address:
            self._slots[slot] = address
            self._changed()
        self.refresh_soon()

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_now_and_then()))

    async def _refresh_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(CLUSTER_REFRESH)
            self.refresh_soon()

    async def refresh(self) -> None:
        """Read CLUSTER SLOTS from the first node that answers (known primaries, then
        the seeds)."""
        for node in [*self.primaries(), *(s for s in self.seeds if s not in self.primaries())]:
            try:
                reply = await self._ask(node, "CLUSTER", "SLOTS")
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("cluster node %s did not answer CLUSTER SLOTS: %s", node, exc)
                continue
            slots = _slot_map(reply, node)
            if slots != self._slots:
                self._slots = slots
                self._changed()
            return
        raise RedisError("no cluster node answered CLUSTER SLOTS")


def _slot_map(reply: Any, asked: Address) -> list[Address | None]:
    slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    for start, end, primary, *_replicas in reply:
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        owner = Address(host or asked.host, int(primary[1]))  # "" means: the node asked
        for slot in range(int(start), int(end) + 1):
            slots[slot] = owner
    return slots


def topology_for(url: str, *, timeout: float, sentinel_password: str | None = None) -> Topology:
    """The topology a ``redis.url`` names (see gateway/config/redis_url.py)."""
    location = parse_redis_url(url)
    options = NodeOptions(location, timeout)
    nodes = [Address(host, port) for host, port in location.nodes]
    if location.kind == "sentinel":
        assert location.service is not None
        return SentinelPrimary(options, nodes, location.service, sentinel_password)
    if location.kind == "cluster":
        return ClusterSlots(options, nodes)
    if options.unix_path is not None:
        return Topology(options, Address(options.unix_path, 0))
    parsed = parse_url(url)
    return Topology(
        options, Address(parsed.get("host", "localhost"), int(parsed.get("port", 6379)))
    )
