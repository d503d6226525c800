"""The one door every Redis call goes through: a deadline, a circuit breaker and
error wrapping.

A slow Redis must not make every request slow, so each call gets ``timeout``
seconds; whatever goes wrong comes out as ``StorageError`` and the gateway fails
closed on it. After ``threshold`` failures in a row the breaker opens: for a
cooldown (doubling on each failed probe, up to a cap) calls fail at once instead
of piling onto a dead Redis; then one call probes, and a success closes it again.

The deadline measures Redis, not this process: when a flash crowd keeps the event
loop busy, a reply can sit unread in the socket for longer than the deadline.
Failing then would refuse buyers Redis had already decided for. So a tick every
``STALL_TICK`` seconds watches how late the loop runs it, and adds the time the
loop was stalled back to every running deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from limiter.errors import StorageError

T = TypeVar("T")

STALL_TICK = 0.01
#: Lateness below this is ordinary scheduling jitter, not a stall.
STALL_TOLERANCE = 0.002


class StallClock:
    """Measures event-loop stalls and extends the deadlines it is given by them.

    Two kinds: ``asyncio.Timeout`` objects (rescheduled after a stall), and futures
    ``watch``ed until a deadline on a clock that stops while the loop stalls. The
    latter cost no timer of their own, which matters at one or two per request; they
    expire on the next tick (within ``STALL_TICK``) after their deadline. The clock
    ticks only while it has deadlines to keep: stalls of an idle loop go unmeasured.
    """

    def __init__(self) -> None:
        self.deadlines: set[asyncio.Timeout] = set()
        #: Longest stall seen since the last ``take_max_stall()``, in seconds.
        self.max_stall = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0
        #: Loop time lost to stalls so far: the watch clock is loop time minus this.
        self._stalled = 0.0
        self._watched: list[tuple[float, int, asyncio.Future[Any], Callable[[], None]]] = []
        self._watch_count = 0

    def watch(
        self, future: asyncio.Future[Any], seconds: float, expire: Callable[[], None]
    ) -> None:
        """Call ``expire()`` if ``future`` is still pending ``seconds`` from now, not
        counting stalls."""
        self.ensure_running()
        assert self._loop is not None
        self._watch_count += 1
        due = self._loop.time() - self._stalled + seconds
        heapq.heappush(self._watched, (due, self._watch_count, future, expire))

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
            self._stalled += stall
            for deadline in list(self.deadlines):
                when = deadline.when()
                if when is not None and not deadline.expired():
                    with contextlib.suppress(RuntimeError):  # it fired during the stall
                        deadline.reschedule(when + stall)
        watched = self._watched
        clock = now - self._stalled
        while watched and watched[0][0] <= clock:
            _, _, future, expire = heapq.heappop(watched)
            if not future.done():
                expire()
        if self.deadlines or watched:
            self._schedule(now)
        else:  # nothing to keep: an idle process does not wake 100 times a second
            self._handle = None

    def take_max_stall(self) -> float:
        stall, self.max_stall = self.max_stall, 0.0
        return stall

    def stop(self) -> None:
        """Stop ticking; waits still pending fail now (nothing would expire them)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        watched, self._watched = self._watched, []
        for _, _, future, expire in watched:
            if not future.done():
                expire()


class CircuitBreaker:
    def __init__(
        self, threshold: int = 5, cooldown: float = 0.25, max_cooldown: float = 2.0
    ) -> None:
        self.threshold = threshold
        self.first_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.failures = 0
        self.cooldown = cooldown
        self.open_until = 0.0
        self._probing = False
        #: Times it opened, for metrics.
        self.openings = 0

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self, now: float) -> bool:
        """Whether a call may go to Redis now (while open: one probe per cooldown)."""
        if not self.is_open:
            return True
        if now < self.open_until or self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.cooldown = self.first_cooldown
        self._probing = False

    def failed(self, now: float) -> None:
        was_open = self.is_open
        self.failures += 1
        if was_open:  # a failed probe: wait longer before the next
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        elif self.is_open:
            self.openings += 1
        if self.is_open:
            self.open_until = now + self.cooldown
            self._probing = False


class RedisGuard:
    def __init__(self, timeout: float, breaker: CircuitBreaker | None = None) -> None:
        self.timeout = timeout
        self.stalls = StallClock()
        self.breaker = breaker or CircuitBreaker()
        #: Failures by operation, for metrics.
        self.errors: dict[str, int] = {}

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        what: str,
        *,
        breaker: CircuitBreaker | None = None,
    ) -> T:
        """Run ``call()`` within the deadline; ``what`` names it in the error.

        ``breaker``: the one that judges this call's node (default: the guard's own).
        """
        breaker = breaker or self.breaker
        loop = asyncio.get_running_loop()
        if not breaker.allow(loop.time()):
            wait = max(breaker.open_until - loop.time(), 0.0)
            raise StorageError(
                f"redis failed {breaker.failures} times in a row; not asking it {what} "
                f"for {wait:.1f}s more (circuit open)",
                maybe_applied=False,
            )
        self.stalls.ensure_running()
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                self.stalls.deadlines.add(deadline)
                try:
                    result = await call()
                finally:
                    self.stalls.deadlines.discard(deadline)
        except TimeoutError as exc:
            self._failed(what, breaker)
            raise StorageError(f"redis did not answer {what} within {self.timeout:g}s") from exc
        except (RedisError, OSError) as exc:
            self._failed(what, breaker)
            raise StorageError(f"redis failed {what}: {exc}") from exc
        breaker.succeeded()
        return result

    def _failed(self, what: str, breaker: CircuitBreaker | None) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if breaker is not None:
            breaker.failed(asyncio.get_running_loop().time())

    async def wait(self, future: asyncio.Future[T], what: str, *, cancel: bool = True) -> T:
        """Wait for a queued command's reply within the deadline (the pipeline that
        carries it is what the breaker judges).

        Past the deadline ``future`` fails with StorageError (a pipeline not yet sent
        then leaves it out). With ``cancel=False`` it is left alone and a late reply
        still lands in it (its owner can then undo what it did: see TickBatcher).
        A failure counts once against ``what``, whether the deadline came first or the
        pipeline's own failure.
        """
        waiter = future if cancel else _follower(future)

        def expire() -> None:
            waiter.set_exception(
                StorageError(f"redis did not answer {what} within {self.timeout:g}s")
            )

        self.stalls.watch(waiter, self.timeout, expire)
        try:
            return await waiter
        except StorageError:
            self._failed(what, None)
            raise

    def close(self) -> None:
        self.stalls.stop()


def _follower(future: asyncio.Future[T]) -> asyncio.Future[T]:
    """A future that takes ``future``'s outcome; cancelling it leaves ``future`` alone."""
    follower: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def follow(done: asyncio.Future[T]) -> None:
        if follower.done():
            return
        if done.cancelled():
            follower.cancel()
        elif (failure := done.exception()) is not None:
            follower.set_exception(failure)
        else:
            follower.set_result(done.result())

    future.add_done_callback(follow)
    return follower
