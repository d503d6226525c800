"""The waiting room's Lua scripts through their typed wrappers (limiter/waiting.py),
against a real Redis: places and the shuffle, the cap on passes, the admission rate by
Redis's clock, closing, withdrawing, and the scripts on a Redis Cluster (one slot)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from gateway.embedded.topology import ClusterTopology
from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.scripts import Scripts
from limiter.waiting import (
    JoinStatus,
    PassStatus,
    QueuePolicy,
    QueueStore,
    WaiterState,
    block_of,
)
from tests.helpers import auto_pipeline, wait_for

pytestmark = pytest.mark.integration

SCRIPTS = Scripts.read()
LATE = 2**40


def policy(**changes: object) -> QueuePolicy:
    values: dict[str, object] = {
        "mode": "fifo",
        "starts_at_ms": 0,
        "admit_rate": 1000.0,
        "max_passes_per_unit": 2.0,
        "close_factor": 1000.0,
        "pass_ttl_ms": 60_000,
        "heartbeat_ms": 60_000,
    }
    values.update(changes)
    return QueuePolicy(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def queue(
    url: str, client: Redis, available: int, campaign: str = "c1", **changes: object
) -> AsyncIterator[QueueStore]:
    keys = CampaignKeys(campaign)
    await client.hset(
        keys.state,
        mapping={"available": available, "reserved": 0, "sold": 0, "stock_total": available},
    )
    async with auto_pipeline(url, 2.0) as pipe:
        yield QueueStore(pipe, SCRIPTS, keys, policy(**changes))


async def blocks_agree(redis: Redis, campaign: str = "c1") -> None:
    """The blocks hash counts exactly the line's places (recounted here from the line)."""
    keys = CampaignKeys(campaign).queue
    line = cast(list[tuple[bytes, float]], await redis.zrange(keys.line, 0, -1, withscores=True))
    counted: dict[int, int] = {}
    for _, place in line:
        counted[block_of(int(place))] = counted.get(block_of(int(place)), 0) + 1
    stored = {
        (4096 if k.decode()[0] == "l" else 0) + int(k.decode()[1:]): int(v)
        for k, v in cast(dict[bytes, bytes], await redis.hgetall(keys.blocks)).items()
    }
    assert stored == counted


async def join_all(store: QueueStore, users: list[str]) -> None:
    for user in users:
        assert (await store.join(user, "", 0, "00")).status is JoinStatus.WAITING


async def test_fifo_places_are_arrival_order_and_joining_again_keeps_the_place(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 10, admit_rate=0.001) as store:
        users = [f"u{i}" for i in range(20)]
        await join_all(store, users)
        again = await store.join("u7", "", 0, "00")
        assert (again.status, again.position, again.place) == (JoinStatus.WAITING, 8, LATE + 8)
        waiters = await store.touch([(u, "") for u in users])
        assert [w.position for w in waiters] == list(range(1, 21))
        await blocks_agree(redis)


async def test_random_mode_places_are_drawn_before_the_start_and_told_after(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    starts = int(time.time() * 1000) + 1500
    async with queue(
        redis_server.url, redis, 1000, mode="random", starts_at_ms=starts, admit_rate=0.001
    ) as store:
        early = [f"early-{i}" for i in range(300)]
        for user in early:
            joined = await store.join(user, "", 0, "ab")
            assert (joined.status, joined.prequeue, joined.position) == (
                JoinStatus.WAITING,
                True,
                0,
            )
        # before the start no position is told, however often one asks
        assert {w.position for w in await store.touch([(u, "") for u in early])} == {0}
        before = (await store.tick(100, force=True)).view
        assert (before.final, before.shuffled_ms) == (False, 0)
        await asyncio.sleep(max(0, starts / 1000 - time.time()) + 0.05)  # until starts_at
        after = (await store.tick(100, force=True)).view
        assert after.final
        assert (after.shuffled_ms >= starts, after.prequeue) == (True, 300)
        late = await store.join("late", "", 0, "ab")
        assert (late.status, late.position, late.prequeue) == (JoinStatus.WAITING, 301, False)
        positions = [w.position for w in await store.touch([(u, "") for u in early])]
        assert sorted(positions) == list(range(1, 301))
        # the order is not the arrival order: Spearman's rho of 300 independent places is
        # within 0.25 of 0 but for a chance below 1e-5
        assert abs(spearman(list(range(300)), positions)) < 0.25
        # joining again draws nothing new
        assert (await store.join("early-5", "", 0, "cd")).position == positions[5]
        await blocks_agree(redis)


def spearman(a: list[int], b: list[int]) -> float:
    n = len(a)
    ranked_a, ranked_b = ranks(a), ranks(b)
    d2 = sum((x - y) ** 2 for x, y in zip(ranked_a, ranked_b, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


def ranks(values: list[int]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0] * len(values)
    for rank, index in enumerate(order):
        out[index] = rank
    return out


async def test_passes_never_exceed_the_cap_and_follow_the_line(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 5, max_passes_per_unit=2.0) as store:
        users = [f"u{i}" for i in range(30)]
        await join_all(store, users)
        await wait_for(lambda: _outstanding(store, 10))
        states = await store.touch([(u, "") for u in users])
        assert [w.state for w in states[:10]] == [WaiterState.ADMITTED] * 10
        assert [w.position for w in states[10:]] == list(range(1, 21))
        view = (await store.tick(100, force=True)).view
        assert (view.outstanding, view.cap, view.issued) == (10, 10, 10)
        # a pass used frees its slot for the next in line
        assert await store.use_passes(["u0"]) == 1
        await wait_for(lambda: _outstanding(store, 10))
        assert (await store.touch([("u10", "")]))[0].state is WaiterState.ADMITTED
        assert await store.check_passes(["u0", "u1", "nobody"]) == [
            PassStatus.USED,
            PassStatus.GOOD,
            PassStatus.NONE,
        ]


async def _outstanding(store: QueueStore, count: int) -> bool:
    view = (await store.tick(100, force=True)).view
    return view.outstanding == count and view.issued >= count


async def test_admission_follows_admit_rate_by_redis_clock(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The bucket starts empty and holds half a second at most: over any stretch of
    T seconds at most admit_rate x (T + 0.5) passes go, however many callers tick."""
    async with queue(redis_server.url, redis, 10_000, admit_rate=20.0) as store:
        await join_all(store, [f"u{i}" for i in range(200)])
        started = time.monotonic()
        ticks = [store.tick(1, force=True) for _ in range(50)]  # a crowd of gateways at once
        issued = sum(len(t.waits_ms) for t in await asyncio.gather(*ticks))
        assert issued <= 20 * (time.monotonic() - started + 0.5) + 1
        await asyncio.sleep(1.0)  # one second of admission
        elapsed = time.monotonic() - started
        total = (await store.tick(1, force=True)).view.issued
        assert total <= 20 * (elapsed + 0.5) + 1
        assert total >= 10  # it does admit


async def test_positions_from_the_view_are_exact_in_front_and_within_a_block_behind(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """3,000 waiters, then a third abandon, the stock falls (the tail is closed) and a few
    are admitted: every position told from the view is within its block's count of the
    exact rank, and exact among the first 256; the blocks still count the line."""
    async with queue(redis_server.url, redis, 1000, close_factor=900) as store:
        users = [f"u{i:05d}" for i in range(3000)]
        await join_all(store, users)
        keys = CampaignKeys("c1").queue
        await redis.zadd(keys.seen, {u: 1 for u in users[::3]})  # their heartbeats are old
        assert (await store.tick(100, force=True)).view.abandoned == 1000
        await redis.hset(CampaignKeys("c1").state, "available", 2)  # 1,800 may wait
        await asyncio.sleep(0.1)  # a few passes' worth of admission
        view = (await store.tick(100, force=True)).view
        assert view.closed == 200
        assert view.issued > 0
        await blocks_agree(redis)
        line = cast(
            list[tuple[bytes, float]], await redis.zrange(keys.line, 0, -1, withscores=True)
        )
        assert view.length == len(line) == 1800 - view.issued
        for rank, (user, place) in enumerate(line):
            estimate = view.rank_of(int(place))
            assert estimate is not None, user
            told, error = estimate
            assert abs(told - rank) <= error, (user, rank, told, error)
            if rank < 256:
                assert (told, error) == (rank, 0)
        assert view.rank_of(int(line[0][1]) - 1) is None  # ahead of the front: not waiting


async def test_a_stock_drop_withdraws_the_newest_passes(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 4, max_passes_per_unit=1.0) as store:
        users = [f"u{i}" for i in range(6)]
        await join_all(store, users)
        await wait_for(lambda: _outstanding(store, 4))
        await redis.hset(CampaignKeys("c1").state, "available", 2)
        # at once, before any tick: only the two oldest passes may buy
        statuses = await store.check_passes(users[:4])
        assert statuses == [PassStatus.GOOD] * 2 + [PassStatus.WITHDRAWN] * 2
        view = (await store.tick(100, force=True)).view
        assert (view.outstanding, view.withdrawn) == (2, 2)
        assert set(view.recently_withdrawn) == {"u2", "u3"}
        waiters = await store.touch([(u, "") for u in ("u2", "u3", "u4")])
        assert [w.position for w in waiters] == [1, 2, 3]  # back at the front, in their order
        assert await store.check_passes(["u2"]) == [PassStatus.WITHDRAWN]
        await blocks_agree(redis)


async def test_a_gap_in_the_ticks_drops_nobody_for_a_heartbeat(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """Redis unreachable (or every gateway down) longer than the heartbeat: nobody could
    poll, so the first tick after it drops nobody; one heartbeat later the silent go."""
    async with queue(redis_server.url, redis, 10, admit_rate=0.001, heartbeat_ms=1000) as store:
        await join_all(store, ["u1", "u2"])
        await store.tick(100, force=True)
        meta = CampaignKeys("c1").queue.meta
        await redis.hset(meta, "tick_ms", 1)  # the last tick, long ago
        await redis.zadd(CampaignKeys("c1").queue.seen, {"u1": 1, "u2": 1})  # silent since
        view = (await store.tick(100, force=True)).view
        assert (view.abandoned, view.length) == (0, 2)
        await store.heartbeat(["u2"], int((await redis.time())[0]) * 1000)  # u2 polls again
        await redis.hset(meta, "grace_ms", 1)  # the grace is over
        view = (await store.tick(100, force=True)).view
        assert (view.abandoned, view.length) == (1, 1)
        await blocks_agree(redis)


async def test_sell_out_closes_every_waiter_and_every_unused_pass(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 2, max_passes_per_unit=1.0) as store:
        users = [f"u{i}" for i in range(5)]
        await join_all(store, users)
        await wait_for(lambda: _outstanding(store, 2))
        await redis.hset(CampaignKeys("c1").state, "available", 0)
        view = (await store.tick(100, force=True)).view
        assert (view.length, view.outstanding, view.closed) == (0, 0, 5)
        assert {w.state for w in await store.touch([(u, "") for u in users])} == {
            WaiterState.CLOSED
        }
        assert (await store.join("late", "", 0, "00")).status is JoinStatus.SOLD_OUT
        await blocks_agree(redis)


async def test_a_join_that_changes_nothing_writes_nothing(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 3) as store:
        assert (await store.join("u1", "a" * 32, 10**13, "00")).status is JoinStatus.WAITING
        before = await redis.dump(CampaignKeys("c1").queue.meta)
        assert (await store.join("u2", "a" * 32, 10**13, "00")).status is JoinStatus.REPLAYED
        assert await redis.dump(CampaignKeys("c1").queue.meta) == before
        assert not await redis.zscore(CampaignKeys("c1").queue.line, "u2")
        assert (
            await store.join(
                "u9",
                "",
                0,
                "00",
            )
        ).status is JoinStatus.WAITING
        missing = QueueStore(store.pipe, SCRIPTS, CampaignKeys("nothing"), store.policy)
        assert (await missing.join("u1", "", 0, "00")).status is JoinStatus.NO_CAMPAIGN
        assert not await redis.exists(CampaignKeys("nothing").queue.meta)


async def test_a_campaign_without_counters_closes_nobody(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 3) as store:
        await join_all(store, ["u1", "u2"])
        await redis.delete(CampaignKeys("c1").state)  # Redis lost them: no sell-out
        assert (await store.tick(100, force=True)).view.missing
        assert [w.state for w in await store.touch([("u1", ""), ("u2", "")])] == [
            WaiterState.WAITING
        ] * 2


async def test_the_scripts_load_again_after_a_script_flush(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 3) as store:
        await join_all(store, ["u1"])
        await redis.script_flush()
        await join_all(store, ["u2"])
        assert (await store.tick(100, force=True)).view.length == 2


async def test_a_malformed_call_is_refused_by_the_script(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with queue(redis_server.url, redis, 3, mode="lottery") as store:
        with pytest.raises(StorageError, match="queue_join: malformed call"):
            await store.join("u1", "", 0, "00")
        with pytest.raises(StorageError, match="queue_tick: malformed call"):
            await store.tick(100)


@pytest.mark.slow
async def test_the_scripts_run_on_a_redis_cluster(cluster_topology: ClusterTopology) -> None:
    """Every key a queue script touches shares the campaign's slot (else CROSSSLOT)."""
    client = Redis(port=cluster_topology.primaries()[0])
    campaign = f"queue-{time.monotonic_ns()}"
    keys = CampaignKeys(campaign)
    owner = Redis(port=cluster_topology.primary_for_key(keys.state))
    try:
        await owner.hset(
            keys.state, mapping={"available": 3, "reserved": 0, "sold": 0, "stock_total": 3}
        )
        async with auto_pipeline(cluster_topology.url, 2.0) as pipe:
            store = QueueStore(pipe, SCRIPTS, keys, policy(max_passes_per_unit=1.0))
            await join_all(store, ["u1", "u2", "u3", "u4"])
            await wait_for(lambda: _outstanding(store, 3))
            assert await store.check_passes(["u1"]) == [PassStatus.GOOD]
            assert await store.use_passes(["u1"]) == 1
            assert [w.state for w in await store.touch([("u4", "")])] == [WaiterState.WAITING]
    finally:
        await client.aclose()
        await owner.aclose()
