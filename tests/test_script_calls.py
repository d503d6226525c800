"""Script calls through the auto-pipeline: one round trip per tick, a split at
max_commands, a refused command, a Redis that is down or paused.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis, free_port
from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.guard import RedisGuard
from limiter.pipeline import AutoPipeline
from limiter.records import Attempt, Figures
from limiter.topology import topology_for
from tests.helpers import check_invariant
from tests.scripts_rig import CAMPAIGN, Rig, attempt, open_rig

pytestmark = pytest.mark.integration


async def test_the_calls_of_one_tick_share_one_round_trip(rig: Rig, redis: Redis) -> None:
    trips, commands = rig.pipe.round_trips, rig.pipe.commands
    replies = await asyncio.gather(*(rig.pipe.call("INCR", "n", what="incr") for _ in range(300)))
    assert replies == list(range(1, 301))  # in order
    assert rig.pipe.round_trips - trips == 1
    assert rig.pipe.commands - commands == 300


async def test_a_big_tick_is_split_at_max_commands(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    guard = RedisGuard(1.0)
    pipe = AutoPipeline(topology_for(redis_server.url, timeout=1.0), guard, max_commands=100)
    try:
        replies = await asyncio.gather(*(pipe.call("INCR", "n", what="incr") for _ in range(250)))
        # the three pipelines travel on three connections at once: no order between them
        assert sorted(replies) == list(range(1, 251))
        assert (pipe.round_trips, pipe.commands) == (3, 250)
    finally:
        await pipe.close()
        guard.close()


async def test_one_refused_command_does_not_fail_its_pipeline(rig: Rig, redis: Redis) -> None:
    await redis.hset("a-hash", "f", "v")
    results: tuple[Any, ...] = await asyncio.gather(
        rig.pipe.call("INCR", "n", what="incr"),
        rig.pipe.call("INCR", "a-hash", what="incr"),
        rig.pipe.call("INCR", "n", what="incr"),
        return_exceptions=True,
    )
    good, bad, also_good = results
    assert (good, also_good) == (1, 2)
    assert isinstance(bad, StorageError)
    assert "WRONGTYPE" in str(bad)


async def test_a_redis_that_is_down_gives_storage_error() -> None:
    async with open_rig(f"redis://127.0.0.1:{free_port()}/0") as down:
        store = down.store()
        # it does not hang: every call fails within a few 1 s deadlines (TimeoutError if not)
        async with asyncio.timeout(15):
            with pytest.raises(StorageError) as refused:
                await down.pipe.call("PING", what="ping")
            assert not refused.value.maybe_applied  # no connection: nothing reached Redis
            with pytest.raises(StorageError):
                await store.reserve([attempt("alice")])
            unknown: list[Attempt] = []
            batcher = TickBatcher(
                store.pipe.guard,
                store.submit_reserve,
                store.decisions,
                "reserve",
                unknown=unknown.extend,
            )
            results = await asyncio.gather(
                *(batcher.submit(attempt(f"u{i}")) for i in range(5)), return_exceptions=True
            )
            await batcher.close()
            assert all(isinstance(r, StorageError) and not r.maybe_applied for r in results), (
                results
            )
            assert unknown == []  # nothing to undo: it was never sent
            while not down.pipe.guard.breaker.is_open:
                with contextlib.suppress(StorageError):
                    await down.pipe.call("PING", what="ping")
            with pytest.raises(StorageError, match="circuit open") as shut:
                await down.pipe.call("PING", what="ping")
            assert not shut.value.maybe_applied


async def test_a_paused_redis_gives_storage_error_instead_of_hanging(
    redis_server: EmbeddedRedis, rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)  # the pipeline's connection is open and warm
    process = redis_server.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        # the guard's deadline answers it: StorageError, not a hang (TimeoutError if it hung)
        async with asyncio.timeout(5):
            with pytest.raises(StorageError, match="did not answer") as silent:
                await store.figures()
        assert silent.value.maybe_applied  # written, unanswered: only Redis knows
    finally:
        process.send_signal(signal.SIGCONT)
    assert await store.figures() == Figures(10, 0, 0, 10)  # and it recovers
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
