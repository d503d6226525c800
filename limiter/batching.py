"""Micro-batching: the items of one event-loop tick go to Redis as one script call.

A naive gateway pays one script call, and redis-py's whole Python path, per
request. Here items queue up while the loop runs; at the end of the tick they
leave together as one call that decides them in order. While ``max_inflight``
calls are out, newcomers wait and the next batch grows: the busier the gateway,
the fewer round trips per request.

If the deadline passes, every waiter fails (the gateway answers 503), but Redis
may still decide: ``unclaimed`` then sees each outcome nobody waited for, so that
what was done can be undone (a reservation goes back to stock at once). When no
outcome ever comes back (the connection broke with the call written), ``unknown``
gets the items, to find out from Redis later and undo what it did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from limiter.errors import StorageError
from limiter.guard import RedisGuard

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - item
O = TypeVar("O")  # noqa: E741 - outcome


class TickBatcher(Generic[I, O]):
    def __init__(
        self,
        guard: RedisGuard,
        submit: Callable[[Sequence[I]], asyncio.Future[Any]],
        parse: Callable[[Sequence[I], Any], list[O]],
        what: str,
        *,
        unclaimed: Callable[[I, O], Awaitable[object] | None] | None = None,
        unknown: Callable[[Sequence[I]], None] | None = None,
        max_batch: int = 128,
        max_inflight: int = 2,
    ) -> None:
        self.guard = guard
        self._submit = submit
        self._parse = parse
        self.what = what
        self.unclaimed = unclaimed
        self.unknown = unknown
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._pending: list[tuple[I, asyncio.Future[O]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Script calls made and items decided, for metrics and benchmarks.
        self.calls = 0
        self.items = 0

    async def submit(self, item: I) -> O:
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._scheduled and self._pending and self._inflight < self.max_inflight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self.max_inflight:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._inflight += 1
            items = [item for item, _ in batch]
            # Submitted now, not in the task: the call joins this tick's pipeline.
            self._spawn(self._decide(batch, items, self._submit(items)))

    async def _decide(
        self, batch: list[tuple[I, asyncio.Future[O]]], items: list[I], reply: asyncio.Future[Any]
    ) -> None:
        try:
            outcomes = self._parse(items, await self.guard.wait(reply, self.what, cancel=False))
        except asyncio.CancelledError:  # abandoned by a stop: the same, then stop
            self._failed(batch, items, reply, StorageError(f"{self.what} abandoned: stopping"))
            raise
        except Exception as exc:
            self._failed(batch, items, reply, exc)
        else:
            self.calls += 1
            self.items += len(batch)
            for (item, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
                else:
                    self._unclaimed(item, outcome)
        finally:
            self._inflight -= 1
            self._schedule()

    def _failed(
        self,
        batch: list[tuple[I, asyncio.Future[O]]],
        items: list[I],
        reply: asyncio.Future[Any],
        failure: BaseException,
    ) -> None:
        """Every waiter gets the failure, none is left hanging; an outcome that still
        comes is seen, so that what Redis did is undone."""
        for _, future in batch:
            if not future.done():
                future.set_exception(failure)
        reply.add_done_callback(lambda done: self._late(items, done))

    def _late(self, items: list[I], reply: asyncio.Future[Any]) -> None:
        failure = None if reply.cancelled() else reply.exception()
        if reply.cancelled() or failure is not None:
            if isinstance(failure, StorageError) and not failure.maybe_applied:
                return  # it never reached Redis
            # Sent, perhaps, but no answer came: only Redis knows whether it acted.
            if self.unknown is not None:
                self.unknown(items)
            return
        for item, outcome in zip(items, self._parse(items, reply.result()), strict=True):
            self._unclaimed(item, outcome)

    def _unclaimed(self, item: I, outcome: O) -> None:
        if self.unclaimed is not None:
            work = self.unclaimed(item, outcome)
            if work is not None:
                self._spawn(self._quietly(work))

    async def _quietly(self, work: Awaitable[object]) -> None:
        try:
            await work
        except Exception:
            log.exception("undoing an unclaimed %s outcome failed", self.what)

    def _spawn(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float | None = None) -> None:
        """Wait for the calls in flight and for the undoing they start; after ``grace``
        seconds cancel what is left (an undo that Redis keeps refusing would otherwise
        hold the exit for minutes). What an abandoned undo leaves is settled at its
        deadline: a sync reservation is delivered again from its kept order, a queued one
        handed over; the backend's answer then decides it."""
        loop = asyncio.get_running_loop()
        give_up = None if grace is None else loop.time() + grace
        while self._tasks:
            left = None if give_up is None else max(0.0, give_up - loop.time())
            _, late = await asyncio.wait(list(self._tasks), timeout=left)
            if late and give_up is not None and loop.time() >= give_up:
                log.warning(
                    "stopping: abandoning %d %s task(s) after %gs", len(late), self.what, grace
                )
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=1.0)
                return
