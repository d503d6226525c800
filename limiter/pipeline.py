"""Auto-pipelining: every Redis command a process issues during one event-loop tick
leaves in one pipeline, on one connection, in one round trip.

redis-py spends tens of microseconds of Python per call and holds a pooled
connection for its whole round trip; under a flash crowd, calls queue for
connections and time out for no fault of Redis. Here callers get a future; at the
end of the tick the queued commands are written together. While ``max_inflight``
pipelines are out, the queue grows and the next pipeline carries more.

Scripts go as EVALSHA; a NOSCRIPT answer (Redis restarted, failed over, or its
script cache was flushed) loads the script and sends that command again, so the
pipeline never needs a SCRIPT EXISTS round trip of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from hiredis import pack_command
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from limiter.errors import StorageError
from limiter.guard import RedisGuard
from limiter.logs import Throttled
from limiter.resp import RespConnection, open_like
from limiter.scripts import explain

log = logging.getLogger(__name__)
_faults = Throttled(log)

EncodableArg = str | bytes | int | float


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


def _reloadable(queued: _Queued, reply: Any) -> bool:
    """A script call Redis did not know the script for, not yet sent again."""
    return isinstance(reply, NoScriptError) and queued.script is not None and not queued.retried


class NotReplicated(RedisError):
    """The writes reached the primary but not enough replicas in time."""


#: Round-trip timings kept between two metrics flushes at most.
MAX_TIMINGS = 10_000


@dataclass(slots=True)
class _Queued:
    args: tuple[EncodableArg, ...]
    future: asyncio.Future[Any]
    script: AsyncScript | None = None
    retried: bool = False


@dataclass(slots=True)
class _Progress:
    """How far a round trip got: until it starts writing, Redis has seen nothing."""

    writing: bool = False


class AutoPipeline:
    def __init__(
        self,
        redis: Redis,
        guard: RedisGuard,
        *,
        max_inflight: int = 4,
        max_commands: int = 512,
        replicas: int = 0,
        replica_timeout_ms: int = 100,
    ) -> None:
        self.redis = redis
        self.guard = guard
        #: With replicas > 0 every pipeline ends with WAIT: a pipeline whose writes did not
        #: reach that many replicas in time fails as a whole (see docs: Redis failover).
        self.replicas = replicas
        self.replica_timeout_ms = replica_timeout_ms
        self.max_inflight = max_inflight
        self.max_commands = max_commands
        self._queue: list[_Queued] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Idle connections: one per pipeline in flight at most.
        self._free: list[RespConnection] = []
        self._closed = False
        #: Pipelines sent and commands carried, for metrics and benchmarks.
        self.round_trips = 0
        self.commands = 0
        #: Seconds each recent round trip took (taken away by the metrics).
        self.timings: list[float] = []

    def submit(self, *args: EncodableArg) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply (or a StorageError)."""
        return self._enqueue(_Queued(args, asyncio.get_running_loop().create_future()))

    def submit_script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableArg]
    ) -> asyncio.Future[Any]:
        queued = _Queued(
            ("EVALSHA", script.sha, len(keys), *keys, *args),
            asyncio.get_running_loop().create_future(),
            script,
        )
        return self._enqueue(queued)

    async def call(self, *args: EncodableArg, what: str) -> Any:
        return await self.guard.wait(self.submit(*args), what)

    async def script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableArg], what: str
    ) -> Any:
        return await self.guard.wait(self.submit_script(script, keys, args), what)

    def _enqueue(self, queued: _Queued) -> asyncio.Future[Any]:
        self._queue.append(queued)
        if not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return queued.future

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
            replies = await self.guard.run(lambda: self._execute(batch, progress), "pipeline")
        except Exception as exc:  # StorageError, or a fault here: nobody is left waiting
            if not isinstance(exc, StorageError):
                _faults.log(logging.ERROR, "pipeline", "pipeline failed", exc_info=True)
                exc = StorageError(f"the pipeline failed: {exc!r}")
            if not progress.writing:
                exc = StorageError(str(exc), maybe_applied=False)
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(exc)
        else:
            self.round_trips += 1
            self.commands += len(batch)
            if len(self.timings) < MAX_TIMINGS:
                self.timings.append(time.perf_counter() - started)
            unloaded = await self._load_missing(batch, replies)
            for queued, reply in zip(batch, replies, strict=True):
                self._deliver(queued, reply, unloaded)
        finally:
            self._inflight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, batch: list[_Queued], progress: _Progress) -> list[Any]:
        commands = [queued.args for queued in batch]
        if self.replicas:
            # WAIT covers the writes made on this connection: the whole pipeline.
            commands.append(("WAIT", self.replicas, self.replica_timeout_ms))
        replies = await self._round_trip(commands, progress)
        if not self.replicas:
            return replies
        acknowledged = replies.pop()
        if isinstance(acknowledged, Exception) or int(acknowledged) < self.replicas:
            raise NotReplicated(
                f"only {acknowledged} of {self.replicas} replica(s) acknowledged within "
                f"{self.replica_timeout_ms} ms: a failover could lose these writes"
            )
        return replies

    async def _round_trip(
        self, commands: list[tuple[EncodableArg, ...]], progress: _Progress
    ) -> list[Any]:
        """Write the commands at once on a connection of this pipeline's own and read
        every reply (a refusal comes back as its exception, in its place)."""
        connection = self._idle_connection() or await open_like(self.redis)
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

    async def _load_missing(
        self, batch: list[_Queued], replies: list[Any]
    ) -> dict[str, StorageError]:
        """Load, in one round trip, each script Redis answered NOSCRIPT for (once per
        script, however many of its calls the batch carried); the scripts that could
        not be loaded, by sha, with why."""
        missing: dict[str, str] = {}
        for queued, reply in zip(batch, replies, strict=True):
            if _reloadable(queued, reply) and queued.script is not None:
                missing[queued.script.sha] = cast(str, queued.script.script)  # ours: text
        if not missing:
            return {}
        loads: list[tuple[EncodableArg, ...]] = [
            ("SCRIPT", "LOAD", text) for text in missing.values()
        ]
        try:
            answers = await self.guard.run(
                lambda: self._round_trip(loads, _Progress()), "load scripts"
            )
        except StorageError as exc:  # the commands were refused: they did nothing
            failure = StorageError(str(exc), maybe_applied=False)
            return dict.fromkeys(missing, failure)
        return {
            sha: StorageError(f"redis refused SCRIPT LOAD: {answer}", maybe_applied=False)
            for sha, answer in zip(missing, answers, strict=True)
            if isinstance(answer, RedisError)
        }

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
            self._enqueue(queued)
        elif isinstance(reply, RedisError):
            refusal = explain(str(reply))
            queued.future.set_exception(
                StorageError(f"redis refused {queued.args[0]!r}: {refusal}")
            )
        else:
            queued.future.set_result(reply)

    async def close(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.sleep(0)  # a flush their endings scheduled may start another
        self._closed = True
        for connection in self._free:
            connection.close()
        self._free.clear()
