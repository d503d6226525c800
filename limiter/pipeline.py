"""Auto-pipelining: every Redis command a process issues during one event-loop tick
leaves in one pipeline per node, on one connection, in one round trip.

redis-py spends tens of microseconds of Python per call and holds a pooled
connection for its whole round trip; under a flash crowd, calls queue for
connections and time out for no fault of Redis. Here callers get a future; at the
end of the tick the queued commands are written together. While ``max_inflight``
pipelines are out, the queue grows and the next pipeline carries more.

``AutoPipeline`` routes each command by its first key to the node the topology
names (the one server, the Sentinel's primary, or the cluster node owning the
key's slot) and keeps one ``NodePipeline`` per node. A cluster's redirections are
followed here: MOVED updates the slot map and sends the command to the new owner,
ASK sends it once to the importing node behind ASKING, TRYAGAIN sends it again a
little later; all within the caller's deadline, after which it fails closed.

Scripts go as EVALSHA; a NOSCRIPT answer (Redis restarted, failed over, or its
script cache was flushed) loads the script on that node and sends the command
again, so the pipeline never needs a SCRIPT EXISTS round trip of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from hiredis import pack_command
from redis.exceptions import NoScriptError, RedisError

from limiter.errors import StorageError
from limiter.guard import CircuitBreaker, RedisGuard
from limiter.logs import Throttled
from limiter.resp import RespConnection, open_connection
from limiter.scripts import Script, explain, sharded
from limiter.topology import Address, Topology, topology_for

log = logging.getLogger(__name__)
_faults = Throttled(log)

EncodableArg = str | bytes | int | float

#: Redirections one command may follow before it fails (a slot moving twice over).
MAX_REDIRECTS = 5
#: TRYAGAIN (a slot half migrated): wait this long before sending the command again.
TRY_AGAIN_SECONDS = 0.02
#: Commands that write nothing: a pipeline of only these does not wait for copies, so
#: the stock poll and the metrics keep reading while replicas are missing.
READS = frozenset(
    {
        "PING",
        "GET",
        "HGET",
        "HMGET",
        "HGETALL",
        "XLEN",
        "XRANGE",
        "XREVRANGE",
        "ZRANGE",
        "ZCARD",
        "ZSCORE",
        "ZRANGEBYSCORE",
        "HSCAN",
        "ZSCAN",
        "SCAN",
        "INFO",
        "TIME",
    }
)


def _pack(commands: list[tuple[EncodableArg, ...]]) -> bytes:
    """RESP for all the commands, packed by hiredis in C: redis-py's asyncio connection
    packs in Python, which costs more than the round trip for a batch of reserves."""
    return b"".join(pack_command(command) for command in commands)  # type: ignore[arg-type]


def _shaped(command: EncodableArg, reply: Any) -> Any:
    """HGETALL's flat list as a dict and PING's PONG as True, as redis-py gives them;
    other replies as they came."""
    if command == "HGETALL" and isinstance(reply, list):
        return dict(zip(reply[::2], reply[1::2], strict=True))
    if command == "PING":
        return reply == b"PONG"
    return reply


#: Round-trip timings kept between two metrics flushes at most.
MAX_TIMINGS = 10_000


@dataclass(slots=True)
class _Queued:
    args: tuple[EncodableArg, ...]
    future: asyncio.Future[Any]
    #: The key that routes it (None: any node will do).
    key: str | bytes | None = None
    script: Script | None = None
    retried: bool = False
    #: Send ASKING first (a redirection to a node importing the key's slot).
    asking: bool = False
    redirects: int = 0


@dataclass(slots=True)
class _Progress:
    """How far a round trip got: until it starts writing, Redis has seen nothing."""

    writing: bool = False


@dataclass(slots=True)
class Durability:
    """What a round trip waits for after its writes (see docs/operations.md)."""

    #: WAIT for this many replicas (0: do not wait) ...
    replicas: int = 0
    replica_timeout_ms: int = 100
    #: ... or WAITAOF: the primary's AOF and that many replicas' (Redis 7.2+).
    aof: bool = False

    def command(self) -> tuple[EncodableArg, ...] | None:
        if self.aof:
            return ("WAITAOF", 1, self.replicas, self.replica_timeout_ms)
        if self.replicas:
            return ("WAIT", self.replicas, self.replica_timeout_ms)
        return None

    def shortfall(self, reply: Any) -> str | None:
        """Why ``reply`` (to ``command()``) does not show enough copies, or None."""
        if isinstance(reply, Exception):
            return f"redis refused to wait for copies: {reply}"
        local, copies = (int(reply[0]), int(reply[1])) if self.aof else (1, int(reply))
        if local < 1 or copies < self.replicas:
            what = "AOF" if self.aof else "replica"
            return (
                f"only {copies} of {self.replicas} {what}(s) acknowledged within "
                f"{self.replica_timeout_ms} ms: a failover could lose these writes"
            )
        return None


class NodePipeline:
    """The commands bound for one node: batched per tick, sent on its own connections."""

    def __init__(
        self,
        owner: AutoPipeline,
        address: Address,
        breaker: CircuitBreaker,
        *,
        max_inflight: int,
        max_commands: int,
    ) -> None:
        self.owner = owner
        self.address = address
        self.breaker = breaker
        self.max_inflight = max_inflight
        self.max_commands = max_commands
        self._queue: list[_Queued] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Idle connections: one per pipeline in flight at most.
        self._free: list[RespConnection] = []
        self._closed = False

    @property
    def guard(self) -> RedisGuard:
        return self.owner.guard

    def enqueue(self, queued: _Queued) -> None:
        self._queue.append(queued)
        if not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._inflight < self.max_inflight:
            batch = [q for q in self._queue[: self.max_commands] if not q.future.done()]
            del self._queue[: self.max_commands]
            if not batch:
                continue
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        started = time.perf_counter()
        progress = _Progress()
        try:
            replies, shortfall = await self.guard.run(
                lambda: self._execute(batch, progress), "pipeline", breaker=self.breaker
            )
        except Exception as exc:  # StorageError, or a fault here: nobody is left waiting
            self._failed(batch, exc, progress)
        else:
            self.owner.sent(len(batch), time.perf_counter() - started)
            if shortfall is not None:  # Redis answered (the breaker is content): no copies
                self.owner.unreplicated(shortfall)
                self._failed(batch, StorageError(f"redis: {shortfall}"), progress)
                return
            unloaded = await self._load_missing(batch, replies)
            for queued, reply in zip(batch, replies, strict=True):
                self._deliver(queued, reply, unloaded)
        finally:
            self._inflight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _failed(self, batch: list[_Queued], exc: Exception, progress: _Progress) -> None:
        if not isinstance(exc, StorageError):
            _faults.log(logging.ERROR, "pipeline", "pipeline failed", exc_info=True)
            exc = StorageError(f"the pipeline failed: {exc!r}")
        if exc.__cause__ is not None:  # this node is gone, or no longer the primary: ask again
            self.owner.topology.failed(self.address)
        if not progress.writing:
            exc = StorageError(str(exc), maybe_applied=False)
        for queued in batch:
            if not queued.future.done():
                queued.future.set_exception(exc)

    async def _execute(
        self, batch: list[_Queued], progress: _Progress
    ) -> tuple[list[Any], str | None]:
        """The replies, in the batch's order, and why the writes lack their copies."""
        commands: list[tuple[EncodableArg, ...]] = []
        for queued in batch:
            if queued.asking:
                commands.append(("ASKING",))
            commands.append(queued.args)
        writes = any(q.args[0] not in READS for q in batch)
        wait = self.owner.durability.command() if writes else None
        if wait is not None:
            # WAIT covers the writes made on this connection: the whole pipeline.
            commands.append(wait)
        replies = await self._round_trip(commands, progress)
        shortfall = self.owner.durability.shortfall(replies.pop()) if wait is not None else None
        if wait is not None and shortfall is None:
            self.owner.replicated()
        answers = iter(replies)
        ordered = [(next(answers), next(answers))[1] if q.asking else next(answers) for q in batch]
        return ordered, shortfall

    async def _round_trip(
        self, commands: list[tuple[EncodableArg, ...]], progress: _Progress
    ) -> list[Any]:
        """Write the commands at once on a connection of this pipeline's own and read
        every reply (a refusal comes back as its exception, in its place)."""
        connection = self._idle_connection() or await open_connection(
            self.owner.topology.options, self.address
        )
        try:
            progress.writing = True
            replies = await connection.round_trip(_pack(commands), len(commands))
        except BaseException:
            connection.close()  # half read: never used again
            raise
        if self._closed:
            connection.close()
        elif not connection.closed:  # else it broke after the replies were read: dropped
            self._free.append(connection)
        return [_shaped(args[0], reply) for args, reply in zip(commands, replies, strict=True)]

    def _idle_connection(self) -> RespConnection | None:
        """A free connection that is still open (Redis may have closed one meanwhile)."""
        while self._free:
            connection = self._free.pop()
            if not connection.closed:
                return connection
        return None

    def drop_idle(self) -> None:
        """Close the idle connections (the node is no longer where commands go)."""
        for connection in self._free:
            connection.close()
        self._free.clear()

    async def _load_missing(
        self, batch: list[_Queued], replies: list[Any]
    ) -> dict[str, StorageError]:
        """Load, in one round trip, each script this node answered NOSCRIPT for (once
        per script, however many of its calls the batch carried); the scripts that
        could not be loaded, by sha, with why."""
        missing: dict[str, str] = {}
        for queued, reply in zip(batch, replies, strict=True):
            if _reloadable(queued, reply) and queued.script is not None:
                missing[queued.script.sha] = queued.script.text
        if not missing:
            return {}
        try:
            answers = await self.load(list(missing.values()))
        except StorageError as exc:  # the commands were refused: they did nothing
            failure = StorageError(str(exc), maybe_applied=False)
            return dict.fromkeys(missing, failure)
        return {
            sha: StorageError(f"redis refused SCRIPT LOAD: {answer}", maybe_applied=False)
            for sha, answer in zip(missing, answers, strict=True)
            if isinstance(answer, RedisError)
        }

    async def load(self, texts: list[str]) -> list[Any]:
        """SCRIPT LOAD of each text on this node, in one round trip."""
        loads: list[tuple[EncodableArg, ...]] = [("SCRIPT", "LOAD", text) for text in texts]
        return await self.guard.run(
            lambda: self._round_trip(loads, _Progress()), "load scripts", breaker=self.breaker
        )

    def _deliver(self, queued: _Queued, reply: Any, unloaded: dict[str, StorageError]) -> None:
        if queued.future.done():
            return
        if _reloadable(queued, reply):
            assert queued.script is not None
            failure = unloaded.get(queued.script.sha)
            if failure is not None:
                queued.future.set_exception(failure)
                return
            queued.retried = True
            self.enqueue(queued)
        elif isinstance(reply, RedisError):
            self.owner.refused(queued, reply, self.address)
        else:
            queued.future.set_result(reply)

    async def close(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.sleep(0)  # a flush their endings scheduled may start another
        self._closed = True
        self.drop_idle()


def _reloadable(queued: _Queued, reply: Any) -> bool:
    """A script call Redis did not know the script for, not yet sent again."""
    return isinstance(reply, NoScriptError) and queued.script is not None and not queued.retried


class AutoPipeline:
    """Every command of the process, routed to its node's pipeline."""

    def __init__(
        self,
        topology: Topology,
        guard: RedisGuard,
        *,
        max_inflight: int = 4,
        max_commands: int = 512,
        durability: Durability | None = None,
    ) -> None:
        self.topology = topology
        self.guard = guard
        #: With replicas > 0 every pipeline ends with WAIT (or WAITAOF): a pipeline whose
        #: writes did not reach that many copies in time fails as a whole.
        self.durability = durability or Durability()
        self.max_inflight = max_inflight
        self.max_commands = max_commands
        self._nodes: dict[Address, NodePipeline] = {}
        #: The last shortfall of copies (None once a round trip has its copies again).
        self.replication_problem: str | None = None
        self.unreplicated_round_trips = 0
        #: Pipelines sent and commands carried, for metrics and benchmarks.
        self.round_trips = 0
        self.commands = 0
        #: Seconds each recent round trip took (taken away by the metrics).
        self.timings: list[float] = []
        topology.on_change(self._moved_on)

    # --- queueing

    def submit(self, *args: EncodableArg) -> asyncio.Future[Any]:
        """Queue one command (its key, if any, second: ``HGET key field``); the future
        gets its reply (or a StorageError)."""
        key = args[1] if len(args) > 1 and isinstance(args[1], (str, bytes)) else None
        return self._route(_Queued(args, asyncio.get_running_loop().create_future(), key))

    def submit_script(
        self, script: Script, keys: Sequence[str], args: Sequence[EncodableArg]
    ) -> asyncio.Future[Any]:
        """Queue one script call; all its keys share one hash tag (one slot)."""
        if self.topology.sharded:
            script = sharded(script)
        queued = _Queued(
            ("EVALSHA", script.sha, len(keys), *keys, *args),
            asyncio.get_running_loop().create_future(),
            keys[0] if keys else None,
            script,
        )
        return self._route(queued)

    async def call(self, *args: EncodableArg, what: str) -> Any:
        return await self.guard.wait(self.submit(*args), what)

    async def script(
        self, script: Script, keys: Sequence[str], args: Sequence[EncodableArg], what: str
    ) -> Any:
        return await self.guard.wait(self.submit_script(script, keys, args), what)

    def _route(self, queued: _Queued, address: Address | None = None) -> asyncio.Future[Any]:
        address = address or self.topology.address(queued.key)
        if address is None:
            queued.future.set_exception(
                StorageError("no redis node is known for this key yet", maybe_applied=False)
            )
        else:
            self.node(address).enqueue(queued)
        return queued.future

    def node(self, address: Address) -> NodePipeline:
        node = self._nodes.get(address)
        if node is None:
            # Sentinel: one primary at a time, one breaker; Cluster: a breaker per node,
            # so that a node failing over does not stop the campaigns of the others.
            breaker = CircuitBreaker() if self.topology.sharded else self.guard.breaker
            node = NodePipeline(
                self,
                address,
                breaker,
                max_inflight=self.max_inflight,
                max_commands=self.max_commands,
            )
            self._nodes[address] = node
        return node

    # --- what the nodes report

    def refused(self, queued: _Queued, reply: RedisError, address: Address) -> None:
        """An error reply: a redirection to follow, or the command's failure."""
        text = str(reply)
        word, _, rest = text.partition(" ")
        if word in ("MOVED", "ASK") and queued.redirects < MAX_REDIRECTS:
            slot, _, target = rest.partition(" ")
            host, _, port = target.rpartition(":")
            moved_to = Address(host or address.host, int(port))
            queued.redirects += 1
            queued.asking = word == "ASK"
            if word == "MOVED":
                self.topology.moved(int(slot), moved_to)
            self._route(queued, moved_to)
        elif word == "TRYAGAIN" and queued.redirects < MAX_REDIRECTS * 4:
            queued.redirects += 1
            queued.asking = False
            asyncio.get_running_loop().call_later(TRY_AGAIN_SECONDS, self._route, queued)
        else:
            if word == "CLUSTERDOWN":
                self.topology.failed(address)
            refusal = StorageError(
                f"redis refused {queued.args[0]!r}: {explain(text)}",
                maybe_applied=word not in ("CLUSTERDOWN", "MOVED", "ASK", "TRYAGAIN"),
            )
            queued.future.set_exception(refusal)

    def sent(self, commands: int, seconds: float) -> None:
        self.round_trips += 1
        self.commands += commands
        if len(self.timings) < MAX_TIMINGS:
            self.timings.append(seconds)

    def unreplicated(self, why: str) -> None:
        self.unreplicated_round_trips += 1
        if self.replication_problem is None:
            log.error("redis: %s; failing closed until the copies are back", why)
        self.replication_problem = why

    def replicated(self) -> None:
        if self.replication_problem is not None:
            log.warning("redis: writes have their copies again")
            self.replication_problem = None

    def _moved_on(self) -> None:
        """The primary or the slot map changed: idle connections to nodes that no
        longer serve anything are closed."""
        serving = set(self.topology.primaries())
        for address, node in self._nodes.items():
            if address not in serving:
                node.drop_idle()

    # --- the process's view

    def breakers(self) -> list[CircuitBreaker]:
        return [self.guard.breaker, *(n.breaker for n in self._nodes.values())]

    @property
    def unreachable(self) -> bool:
        """No node is answering: every breaker that has been used is open."""
        used = {id(b): b for b in self.breakers()}.values()
        return all(b.is_open for b in used)

    async def load_scripts(self, scripts: Sequence[Script]) -> None:
        """Load the scripts on every primary now, so the first requests do not pay."""
        texts = [(sharded(s) if self.topology.sharded else s).text for s in scripts]
        primaries = self.topology.primaries()
        if not primaries:
            raise StorageError("no redis primary is known yet", maybe_applied=False)
        for address in primaries:
            for answer in await self.node(address).load(texts):
                if isinstance(answer, RedisError):
                    raise StorageError(f"redis at {address} refused SCRIPT LOAD: {answer}")

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(
        cls, url: str, guard: RedisGuard, *, sentinel_password: str | None = None
    ) -> AsyncIterator[AutoPipeline]:
        """A pipeline to the Redis a ``redis.url`` names, following its topology until
        the block ends (the guard stays the caller's)."""
        topology = topology_for(url, timeout=guard.timeout, sentinel_password=sentinel_password)
        pipe = cls(topology, guard)
        await pipe.start()
        try:
            yield pipe
        finally:
            await pipe.close()

    async def start(self) -> None:
        await self.topology.start()

    async def close(self) -> None:
        for node in list(self._nodes.values()):
            await node.close()
        await self.topology.close()
