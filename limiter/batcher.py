"""Micro-batching: the reserve attempts of one event-loop tick go to Redis as one call.

A naive gateway pays one script call, and redis-py's whole Python path, per
request. Here attempts queue up while the loop runs; at the end of the tick they
leave together, as one reserve.lua call deciding them in order. While
``max_inflight`` calls are out, newcomers wait and the next batch grows: the busier
the gateway, the fewer round trips per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from limiter.records import Attempt, Decision, ReserveStatus
from limiter.store import CampaignStore

log = logging.getLogger(__name__)

#: Called with an attempt that won after its requester went away (cancelled).
OrphanHandler = Callable[[Attempt], Awaitable[None]]


class ReserveBatcher:
    def __init__(
        self,
        store: CampaignStore,
        *,
        max_batch: int = 128,
        max_inflight: int = 2,
        on_orphan: OrphanHandler | None = None,
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.on_orphan = on_orphan
        self._pending: list[tuple[Attempt, asyncio.Future[Decision]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Script calls made and attempts decided, for metrics and benchmarks.
        self.calls = 0
        self.attempts = 0

    async def reserve(self, attempt: Attempt) -> Decision:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((attempt, future))
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
            task = asyncio.get_running_loop().create_task(self._decide(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _decide(self, batch: list[tuple[Attempt, asyncio.Future[Decision]]]) -> None:
        attempts = [attempt for attempt, _ in batch]
        reply = self.store.submit_reserve(attempts)
        try:
            decisions = self.store.decisions(
                await self.store.pipe.guard.wait(reply, "reserve", cancel=False)
            )
        except Exception as exc:  # every waiter gets the failure (503), none is left hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            # Redis may still decide: winners nobody waits for go back to stock at once.
            reply.add_done_callback(lambda done: self._late(attempts, done))
        else:
            self.calls += 1
            self.attempts += len(batch)
            for (attempt, future), decision in zip(batch, decisions, strict=True):
                if not future.done():
                    future.set_result(decision)
                else:
                    self._orphan(attempt, decision)
        finally:
            self._inflight -= 1
            self._schedule()

    def _late(self, attempts: list[Attempt], reply: asyncio.Future[Any]) -> None:
        if reply.cancelled() or reply.exception() is not None:
            return
        for attempt, decision in zip(attempts, self.store.decisions(reply.result()), strict=True):
            self._orphan(attempt, decision)

    def _orphan(self, attempt: Attempt, decision: Decision) -> None:
        if decision.status is ReserveStatus.RESERVED and self.on_orphan is not None:
            self._spawn(self.on_orphan(attempt))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("releasing an orphaned reservation failed; its deadline will")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait for the calls in flight (their reservations must be settled or released)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
