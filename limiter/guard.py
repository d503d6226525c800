"""The one door every Redis call goes through: a deadline and error wrapping.

A slow Redis must not make every request slow, so each call gets ``timeout``
seconds; whatever goes wrong comes out as ``StorageError`` and the gateway fails
closed on it.

The deadline measures Redis, not this process: when a flash crowd keeps the event
loop busy, a reply can sit unread in the socket for longer than the deadline.
Failing then would refuse buyers Redis had already decided for. So a tick every
``STALL_TICK`` seconds watches how late the loop runs it, and adds the time the
loop was stalled back to every running deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from limiter.errors import StorageError

T = TypeVar("T")

STALL_TICK = 0.01
#: Lateness below this is ordinary scheduling jitter, not a stall.
STALL_TOLERANCE = 0.002


class StallClock:
    """Measures event-loop stalls and extends the deadlines it is given by them."""

    def __init__(self) -> None:
        self.deadlines: set[asyncio.Timeout] = set()
        #: Longest stall seen since the last ``take_max_stall()``, in seconds.
        self.max_stall = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0

    def ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._handle is None:
            self._loop = loop
            self._schedule(loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._expected = now + STALL_TICK
        self._handle = self._loop.call_at(self._expected, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        stall = now - self._expected
        if stall > STALL_TOLERANCE:
            self.max_stall = max(self.max_stall, stall)
            for deadline in self.deadlines:
                when = deadline.when()
                if when is not None:
                    deadline.reschedule(when + stall)
        self._schedule(now)

    def take_max_stall(self) -> float:
        stall, self.max_stall = self.max_stall, 0.0
        return stall

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class RedisGuard:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.stalls = StallClock()

    async def run(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``call()`` within the deadline; ``what`` names it in the error."""
        self.stalls.ensure_running()
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                self.stalls.deadlines.add(deadline)
                try:
                    return await call()
                finally:
                    self.stalls.deadlines.discard(deadline)
        except TimeoutError as exc:
            raise StorageError(f"redis did not answer {what} within {self.timeout:g}s") from exc
        except (RedisError, OSError) as exc:
            raise StorageError(f"redis failed {what}: {exc}") from exc

    async def wait(self, future: asyncio.Future[T], what: str, *, cancel: bool = True) -> T:
        """Wait for a queued command's reply within the deadline.

        With ``cancel=False`` a late reply still lands in ``future`` (its owner can
        then undo what it did: see ReserveBatcher).
        """
        return await self.run(lambda: future if cancel else asyncio.shield(future), what)

    def close(self) -> None:
        self.stalls.stop()
