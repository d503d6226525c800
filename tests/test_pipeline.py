"""RedisGuard's stall-compensated deadline, AutoPipeline errors and the reserve
batcher's clean-up, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import limiter.guard
import limiter.pipeline
from gateway.embedded.server import EmbeddedRedis
from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.guard import RedisGuard
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.records import Attempt, Decision, Figures, ReserveStatus
from limiter.reserving import reserve_batcher
from limiter.resp import open_connection
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from limiter.topology import topology_for
from tests.helpers import as_text, auto_pipeline, check_invariant, wait_for

pytestmark = pytest.mark.integration

CAMPAIGN = "c1"


def block_loop(seconds: float) -> None:
    """Keep the event loop busy, as a burst of CPU work under a flash crowd does."""
    time.sleep(seconds)


@contextlib.asynccontextmanager
async def opened(url: str, deadline: float) -> AsyncIterator[CampaignStore]:
    """A store built as gateway/runtime.py builds one, with a ``deadline`` s guard."""
    async with auto_pipeline(url, deadline) as pipe:
        policy = StorePolicy(per_user_limit=2, reserve_deadline_ms=0, ledger_max_length=1000)
        scripts = Scripts.read()
        await pipe.load_scripts(scripts.all())  # as Runtime.prepare() does
        yield CampaignStore(pipe, scripts, CampaignKeys(CAMPAIGN), policy)


@contextlib.asynccontextmanager
async def batching(
    url: str, deadline: float
) -> AsyncIterator[tuple[CampaignStore, TickBatcher[Attempt, Decision]]]:
    """A store with stock 10 and a reserve batcher on it, as a gateway process has."""
    async with opened(url, deadline) as store:
        await store.init(10)
        yield store, reserve_batcher(store, "tester", asyncio.ensure_future)


async def state_of(redis: Redis, store: CampaignStore, reservation_id: str) -> str | None:
    return as_text(await redis.hgetall(store.keys.reservation(reservation_id))).get("state")


async def test_a_reply_delayed_by_an_event_loop_stall_is_not_a_timeout(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with opened(redis_server.url, 0.5) as store:
        await store.init(10)  # connection warm, stall clock ticking
        call = asyncio.create_task(store.reserve([Attempt(new_reservation_id(CAMPAIGN), "a", 1)]))
        await asyncio.sleep(0)  # one loop turn (not a wait): its 0.5 s deadline is running
        block_loop(1.2)
        (decision,) = await call
        assert decision.status is ReserveStatus.RESERVED
        assert store.pipe.guard.stalls.take_max_stall() >= 0.5
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_refused_and_unknown_commands_are_storage_errors(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with opened(redis_server.url, 1.0) as store:
        with pytest.raises(StorageError, match="redis refused"):
            await store.pipe.call("NO-SUCH-COMMAND", what="nonsense")
        assert await store.pipe.call("PING", what="ping") is True  # the pipeline goes on


async def test_the_guard_wraps_redis_and_os_errors(redis: Redis) -> None:
    guard = RedisGuard(1.0)

    async def refused() -> None:
        raise ConnectionRefusedError("nobody home")

    try:
        with pytest.raises(StorageError, match="redis failed refusing: nobody home"):
            await guard.run(refused, "refusing")
        guard.timeout = 0.05
        with pytest.raises(StorageError, match=r"did not answer sleeping within 0\.05s"):
            await guard.run(lambda: asyncio.sleep(5), "sleeping")  # a call that never answers
    finally:
        guard.close()


async def test_a_wait_past_its_deadline_fails_and_a_kept_reply_still_lands() -> None:
    loop = asyncio.get_running_loop()
    guard = RedisGuard(0.05)
    try:
        dropped: asyncio.Future[str] = loop.create_future()
        with pytest.raises(StorageError, match=r"did not answer dropped within 0\.05s"):
            await guard.wait(dropped, "dropped")
        assert dropped.done()  # a pipeline not yet sent leaves it out
        kept: asyncio.Future[str] = loop.create_future()
        with pytest.raises(StorageError, match="did not answer kept"):
            await guard.wait(kept, "kept", cancel=False)
        kept.set_result("late")  # its owner still learns what Redis did
        assert guard.errors == {"dropped": 1, "kept": 1}
        answered: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.01, answered.set_result, "in time")
        assert await guard.wait(answered, "answered") == "in time"
    finally:
        guard.close()


async def test_the_stall_clock_survives_a_deadline_that_fired_during_a_stall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow tick makes the order certain: the deadline (0.05 s) falls due before the
    # first tick (0.2 s), so after the stall the deadline fires first, then the tick runs.
    monkeypatch.setattr(limiter.guard, "STALL_TICK", 0.2)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    guard = RedisGuard(0.05)
    try:
        # The sleeps are the scenario: calls that answer in 5 s (never) and in 0.05 s, each
        # started with one loop turn before the loop is blocked.
        first = asyncio.create_task(guard.run(lambda: asyncio.sleep(5), "first"))
        await asyncio.sleep(0)
        block_loop(0.3)
        with pytest.raises(StorageError):
            await first  # a real timeout: it never answered
        guard.timeout = 0.5
        second = asyncio.create_task(guard.run(lambda: asyncio.sleep(0.05), "second"))
        await asyncio.sleep(0)
        block_loop(1.0)
        await second  # answered in 0.05 s of loop time: the 1 s stall must be added back
        assert errors == []
    finally:
        guard.close()
        loop.set_exception_handler(None)


async def test_close_waits_for_the_release_of_unclaimed_winners(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with batching(redis_server.url, 1.0) as (store, batcher):
        one = Attempt(new_reservation_id(CAMPAIGN), "alice", 1)
        waiter = asyncio.create_task(batcher.submit(one))
        await asyncio.sleep(0)  # one loop turn (not a wait): the attempt is queued
        waiter.cancel()
        await asyncio.sleep(0)  # one loop turn: the batch's call is under way
        try:
            await batcher.close()
            assert await state_of(redis, store, one.reservation_id) == "released"
        finally:

            async def released() -> bool:
                return await state_of(redis, store, one.reservation_id) == "released"

            await wait_for(released)
            await batcher.close()
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_a_reserve_redis_decides_after_the_gateway_gave_up_is_released(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    process = redis_server.process
    assert process is not None
    async with batching(redis_server.url, 0.5) as (store, batcher):
        one = Attempt(new_reservation_id(CAMPAIGN), "alice", 1)
        process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StorageError):
                await batcher.submit(one)
            # the pipeline gives up too (its round trip's deadline)
            await wait_for(lambda: store.pipe.guard.errors.get("pipeline", 0) >= 1)
        finally:
            process.send_signal(signal.SIGCONT)

        async def decided() -> bool:
            return await state_of(redis, store, one.reservation_id) is not None

        await wait_for(decided)  # Redis ran the reserve once it woke up
        try:

            async def released() -> bool:
                return await state_of(redis, store, one.reservation_id) == "released"

            await wait_for(released, within=5.0)
            assert await store.figures() == Figures(10, 0, 0, 10)
        finally:
            await batcher.close()


async def test_a_reply_that_cannot_be_read_fails_its_pipeline_without_leaving_waiters(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fault on this side while reading replies (a bug, not a Redis error).
    shaped = limiter.pipeline._shaped

    def faulty(command: Any, reply: Any) -> Any:
        if command == "XLEN":
            raise TypeError("a reply this side cannot handle")
        return shaped(command, reply)

    monkeypatch.setattr(limiter.pipeline, "_shaped", faulty)
    async with opened(redis_server.url, 2.0) as store:
        pipe = store.pipe
        unreadable = pipe.submit("XLEN", "orders")
        neighbour = pipe.submit("PING")
        async with asyncio.timeout(10):
            results = await asyncio.gather(unreadable, neighbour, return_exceptions=True)
        # failed by the fault itself, not left to the guard's deadline
        assert all(isinstance(r, StorageError) for r in results), results
        assert all("did not answer" not in str(r) for r in results), results
        assert await pipe.call("PING", what="ping") is True  # and the pipeline goes on


async def test_bytes_that_are_not_resp_fail_the_round_trip_and_drop_the_connection(
    redis_server: EmbeddedRedis,
) -> None:
    topology = topology_for(redis_server.url, timeout=1.0)
    connection = await open_connection(topology.options, topology.primaries()[0])
    answer = connection.round_trip(b"*1\r\n$4\r\nPING\r\n", 1)
    connection.data_received(b"?not resp\r\n")  # as if the stream were corrupted
    with pytest.raises(RedisConnectionError, match="unreadable"):
        await answer
    assert connection.closed
    late = connection.round_trip(b"*1\r\n$4\r\nPING\r\n", 1)
    with pytest.raises(RedisConnectionError, match="closed"):
        await late


async def test_close_gives_up_on_an_undo_redis_keeps_refusing(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The undo of an unclaimed winner retries for minutes; stopping waits only its grace."""
    process = redis_server.process
    assert process is not None
    async with batching(redis_server.url, 0.2) as (store, batcher):
        release_unclaimed = batcher.unclaimed
        assert release_unclaimed is not None

        def redis_stops_first(attempt: Attempt, decision: Decision) -> Awaitable[object] | None:
            process.send_signal(signal.SIGSTOP)  # before the undo's first release
            return release_unclaimed(attempt, decision)

        batcher.unclaimed = redis_stops_first
        one = Attempt(new_reservation_id(CAMPAIGN), "alice", 1)
        waiter = asyncio.create_task(batcher.submit(one))
        await asyncio.sleep(0)  # one loop turn (not a wait): the attempt is queued
        waiter.cancel()
        try:
            async with asyncio.timeout(10):  # without the grace: 600 s of retrying
                await wait_for(lambda: _stopped(process.pid))
                await batcher.close(grace=0.5)
        finally:
            process.send_signal(signal.SIGCONT)
    # abandoned: the release it had sent may still land, or the deadline releases it
    assert await state_of(redis, store, one.reservation_id) in ("reserved", "released")
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_decision_abandoned_by_a_stop_answers_its_waiters_and_is_undone_later() -> None:
    """close(grace) cancels what is left: the waiters still get an answer, and an outcome
    Redis sends afterwards still reaches ``unclaimed`` (which undoes it)."""
    guard = RedisGuard(30.0)
    reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    seen: list[tuple[str, str]] = []

    def unclaimed(item: str, outcome: str) -> None:
        seen.append((item, outcome))

    calls: list[list[str]] = []

    def call(items: Sequence[str]) -> asyncio.Future[Any]:
        calls.append(list(items))
        return reply

    batcher: TickBatcher[str, str] = TickBatcher(
        guard, call, lambda items, got: list(got), "decide", unclaimed=unclaimed
    )
    try:
        waiter = asyncio.ensure_future(batcher.submit("a"))
        await wait_for(lambda: calls == [["a"]])  # the call is out, unanswered
        await batcher.close(grace=0.0)
        with pytest.raises(StorageError, match="abandoned"):
            await asyncio.wait_for(waiter, 5.0)
        reply.set_result(["reserved"])
        await wait_for(lambda: seen != [])  # the late outcome reaches unclaimed
        assert seen == [("a", "reserved")]
    finally:
        guard.close()


async def test_closing_the_guard_fails_the_waits_it_would_have_expired() -> None:
    guard = RedisGuard(30.0)
    pending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(guard.wait(pending, "forever"))
    await asyncio.sleep(0)  # one loop turn (not a wait): the wait has begun
    guard.close()
    with pytest.raises(StorageError, match="did not answer forever"):
        await asyncio.wait_for(waiting, 5)
