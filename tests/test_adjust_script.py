"""init_campaign.lua and adjust_stock.lua: the stock figures an operator or a config
file sets, and the notices a change of stock sends.

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from limiter.records import AdjustStatus, Figures
from tests.helpers import check_invariant, ledger, redis_snapshot
from tests.scripts_rig import ACTOR, CAMPAIGN, Rig, listening, notices, reserved

pytestmark = pytest.mark.integration


async def test_init_creates_once_and_a_restart_keeps_the_stock(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    assert await store.init(10, actor="config@a") == (True, Figures(10, 0, 0, 10))
    assert await store.init(99, actor="config@b") == (False, Figures(10, 0, 0, 10))
    await reserved(store, "alice")
    assert await store.init(50, actor="config@c") == (False, Figures(9, 1, 0, 10))
    assert await store.figures() == Figures(9, 1, 0, 10)

    (init, reserve) = await ledger(redis, CAMPAIGN)
    assert init == {
        "op": "init",
        "rid": "",
        "user": "",
        "qty": "10",
        "by": "config@a",
        "before": "0/0/0/0",
        "after": "10/0/0/10",
    }
    assert reserve["op"] == "reserve"
    assert int(await redis.hget(store.keys.state, "created_ms") or 0) > 0
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_adjust_delta_and_set(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(10)
    await reserved(store, "alice")
    assert await store.adjust(delta=5, actor="admin:x") == (
        AdjustStatus.DONE,
        Figures(14, 1, 0, 15),
    )
    assert await store.adjust(delta=-4, actor="admin:x") == (
        AdjustStatus.DONE,
        Figures(10, 1, 0, 11),
    )
    assert await store.adjust(set_to=3, actor="admin:x") == (
        AdjustStatus.DONE,
        Figures(3, 1, 0, 4),
    )
    assert await store.figures() == Figures(3, 1, 0, 4)
    entries = [e for e in await ledger(redis, CAMPAIGN) if e["op"] == "adjust"]
    assert [(e["qty"], e["before"], e["after"], e["by"]) for e in entries] == [
        ("5", "9/1/0/10", "14/1/0/15", "admin:x"),
        ("-4", "14/1/0/15", "10/1/0/11", "admin:x"),
        ("-7", "10/1/0/11", "3/1/0/4", "admin:x"),
    ]
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_adjust_refuses_below_zero(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(3)
    await reserved(store, "alice")
    before = await redis_snapshot(redis)
    assert await store.adjust(delta=-3, actor=ACTOR) == (
        AdjustStatus.BELOW_ZERO,
        Figures(2, 1, 0, 3),
    )
    assert await store.adjust(set_to=-1, actor=ACTOR) == (
        AdjustStatus.BELOW_ZERO,
        Figures(2, 1, 0, 3),
    )
    assert await redis_snapshot(redis) == before
    assert await store.adjust(delta=-2, actor=ACTOR) == (AdjustStatus.DONE, Figures(0, 1, 0, 1))
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)


async def test_adjust_without_campaign_or_figure(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    assert await store.adjust(delta=5, actor=ACTOR) == (
        AdjustStatus.NO_CAMPAIGN,
        Figures(0, 0, 0, 0),
    )
    assert await store.adjust(set_to=5, actor=ACTOR) == (
        AdjustStatus.NO_CAMPAIGN,
        Figures(0, 0, 0, 0),
    )
    assert await redis_snapshot(redis) == {}
    with pytest.raises(ValueError, match="delta or set_to"):
        await store.adjust(actor=ACTOR)


async def test_adjust_announces_sold_out_and_restock(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(3)
    channel = store.keys.events
    async with listening(redis, channel) as pubsub:
        await store.adjust(set_to=0, actor=ACTOR)
        await store.adjust(set_to=0, actor=ACTOR)  # sold out already: no second notice
        await store.adjust(delta=2, actor=ACTOR)
        await store.adjust(delta=1, actor=ACTOR)
        assert await notices(redis, pubsub, channel) == [b"sold-out", b"restock"]
    assert await store.figures() == Figures(3, 0, 0, 3)
    await check_invariant(redis, CAMPAIGN, per_user_limit=2)
