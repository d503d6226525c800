"""After sell-out, a keyed request is answered from memory unless its user holds units:
a user who holds nothing cannot be owed a stored outcome (a released reservation frees
its key), so only the holders' keys are read from Redis, and correctness stays as it
was: a winner's retry replays, a released key is a fresh attempt, a holder's new key
gets sold-out; across processes, and after a cancel or an expired hold."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.helpers import AUTH, Gateway, check_invariant, open_gateway, settings_for, wait_for
from tests.processes import GatewayProcess

pytestmark = pytest.mark.integration

CAMPAIGN = "phone-1111"


async def _commands(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def _sell_out(gateway: Gateway, stock: int = 10) -> dict[str, str]:
    """Every unit to a buyer of its own, each with a key; user -> reservation id."""
    won = {}
    for i in range(stock):
        response = await gateway.buy(f"winner-{i}", key=f"key-{i}")
        assert response.status == 201, await response.text()
        won[f"winner-{i}"] = response.headers["X-Reservation-Id"]
    assert (await gateway.buy("late", key="late-key")).status == 409
    return won


async def _holders_known(gateway: Gateway) -> None:
    await wait_for(lambda: gateway.runtime.watch.holders_of(CAMPAIGN) is not None, within=5)


async def test_a_keyed_request_from_a_user_who_holds_nothing_costs_redis_nothing(
    gateway: Gateway, redis: Redis
) -> None:
    await _sell_out(gateway)
    await _holders_known(gateway)
    gateway.runtime.stop_background()  # polls and heartbeats are commands too
    before = await _commands(redis)
    for i in range(50):
        response = await gateway.buy(f"stranger-{i}", key=f"k-{i}")
        assert response.status == 409
    # the two INFO calls are the only commands Redis saw
    assert await _commands(redis) - before == 1


async def test_a_winners_retry_after_sell_out_replays_its_outcome(
    gateway: Gateway, redis: Redis
) -> None:
    won = await _sell_out(gateway)
    await _holders_known(gateway)
    replay = await gateway.buy("winner-3", key="key-3")
    assert (replay.status, replay.headers["X-Reservation-Id"]) == (201, won["winner-3"])
    assert replay.headers["Idempotent-Replayed"] == "true"
    other_key = await gateway.buy("winner-3", key="another-key")
    assert other_key.status == 409  # a holder's new key: sold out, from Redis
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_a_cancelled_winners_key_is_a_fresh_attempt_and_gets_what_is_left(
    gateway: Gateway, redis: Redis
) -> None:
    won = await _sell_out(gateway)
    await _holders_known(gateway)
    cancel = await gateway.admin.post(f"/reservations/{won['winner-5']}/cancel", headers=AUTH)
    assert cancel.status == 200
    # the unit is back: the flag clears, and winner-5's key names nothing now
    await wait_for(lambda: CAMPAIGN not in gateway.runtime.watch.sold_out, within=5)
    assert gateway.runtime.watch.holders_of(CAMPAIGN) is None
    again = await gateway.buy("winner-5", key="key-5")
    assert again.status == 201
    assert again.headers["X-Reservation-Id"] != won["winner-5"]
    assert "Idempotent-Replayed" not in again.headers
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)


async def test_after_an_expired_hold_the_expired_holder_gets_sold_out_from_memory(
    redis_server: Any, redis: Redis, settings_data: dict[str, Any]
) -> None:
    settings_data["campaigns"][0].update(
        {"stock": 2, "on_success": "hold", "hold_seconds": "1s", "forward_deadline": "3s"}
    )
    async with open_gateway(settings_for(settings_data), redis_server.url) as gw:
        won = await _sell_out(gw, stock=2)
        confirm = await gw.admin.post(f"/reservations/{won['winner-1']}/confirm", headers=AUTH)
        assert confirm.status == 200
        # winner-0's hold expires unpaid: its unit is back, and sold again
        await wait_for(lambda: CAMPAIGN not in gw.runtime.watch.sold_out, within=10)
        assert (await gw.buy("newcomer", key="n-1")).status == 201
        await _holders_known(gw)
        assert gw.runtime.watch.holders_of(CAMPAIGN) == frozenset({"winner-1", "newcomer"})
        answer = await gw.buy("winner-0", key="key-0")
        assert answer.status == 409  # its key was freed by the expiry: a fresh attempt
        await check_invariant(redis, CAMPAIGN, per_user_limit=1)


@pytest.mark.e2e
async def test_two_processes_each_know_the_holders_and_a_new_holder_is_seen(
    redis: Redis, process_config: dict[str, Any], run_gateway: Any, gateway: Gateway
) -> None:
    """A second process sees the sell-out by notice, loads the holders, answers
    strangers from memory and replays winners; a restock and a new winner elsewhere
    change the holders it knows."""
    other: GatewayProcess = run_gateway(process_config)
    won = await _sell_out(gateway)
    async with aiohttp.ClientSession() as session:

        async def buy(user: str, key: str) -> tuple[int, str]:
            headers = {"X-User-Id": user, "Idempotency-Key": key}
            async with session.post(f"{other.url}/seckill/{CAMPAIGN}", headers=headers) as r:
                await r.read()
                return r.status, r.headers.get("X-Reservation-Id", "")

        async def sold_out_there() -> bool:
            return (await buy("probe", "probe"))[0] == 409

        await wait_for(sold_out_there, within=5)
        assert await buy("winner-2", "key-2") == (201, won["winner-2"])
        assert (await buy("stranger", "s-1"))[0] == 409
        store = gateway.runtime.snapshot.campaigns[CAMPAIGN].store
        await store.adjust(delta=1, actor="test")  # one more unit ...
        newcomer = await gateway.buy("newcomer", key="nk")  # ... sold here

        async def replayed_there() -> bool:
            return await buy("newcomer", "nk") == (201, newcomer.headers["X-Reservation-Id"])

        await wait_for(replayed_there, within=5)
    await check_invariant(redis, CAMPAIGN, per_user_limit=1)
