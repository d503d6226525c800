"""What a script failure says, and what a script cache that Redis lost costs: errors
name our files and lines (not the prelude-prefixed text Redis ran), and after a
SCRIPT FLUSH a batch loads each script once, however many calls it carries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from limiter.errors import StorageError
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.pipeline import AutoPipeline
from limiter.records import Attempt, ReserveStatus
from limiter.scripts import Scripts, lua_dir
from limiter.store import CampaignStore, StorePolicy
from tests.helpers import auto_pipeline

pytestmark = pytest.mark.integration

CAMPAIGN = "errors-1"


@pytest.fixture
async def pipe(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[AutoPipeline]:
    async with auto_pipeline(redis_server.url, deadline=5.0) as pipe:
        yield pipe


def _store(pipe: AutoPipeline) -> CampaignStore:
    scripts = Scripts.read()
    return CampaignStore(pipe, scripts, CampaignKeys(CAMPAIGN), StorePolicy(5, 0, 1000))


def _line_of(script: str, text: str) -> int:
    """The line of ``lua/<script>`` holding ``text`` (so the test follows edits)."""
    lines = (lua_dir() / script).read_text().splitlines()
    (line,) = [n for n, content in enumerate(lines, start=1) if text in content]
    return line


def _attempt(user: str = "alice") -> Attempt:
    return Attempt(new_reservation_id(CAMPAIGN), user, 1)


async def test_an_error_in_a_script_names_its_file_and_line(
    pipe: AutoPipeline, redis: Redis
) -> None:
    store = _store(pipe)
    await store.init(10)
    await redis.set(store.keys.users, "not a hash")
    with pytest.raises(StorageError) as failure:
        await store.reserve([_attempt()])
    line = _line_of("reserve.lua", "redis.call('HGET', users_key, user)")
    assert f"@reserve.lua:{line}." in str(failure.value)
    assert "user_script" not in str(failure.value)


async def test_an_error_in_the_prelude_names_the_prelude(pipe: AutoPipeline, redis: Redis) -> None:
    store = _store(pipe)
    await redis.set(store.keys.state, "not a hash")
    with pytest.raises(StorageError) as failure:
        await store.reserve([_attempt()])
    line = _line_of("_prelude.lua", "redis.call('HMGET', state_key")
    assert f"@_prelude.lua:{line}." in str(failure.value)


async def test_after_a_flush_a_batch_loads_each_script_once(
    pipe: AutoPipeline, redis: Redis
) -> None:
    store = _store(pipe)
    await store.init(100)
    await redis.script_flush()
    await redis.config_resetstat()
    # one tick: eight reserve calls and eight reads of figures through a script
    reserves = [store.reserve([_attempt(f"user-{i}")]) for i in range(8)]
    dues = [store.due() for _ in range(8)]
    decisions = await asyncio.gather(*reserves)
    assert all(d[0].status is ReserveStatus.RESERVED for d in decisions)
    assert await asyncio.gather(*dues) == [[]] * 8
    stats = await redis.info("commandstats")
    assert stats["cmdstat_script|load"]["calls"] == 2  # reserve.lua and due.lua, once each
    assert (await store.figures()).reserved == 8
