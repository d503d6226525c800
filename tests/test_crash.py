"""kill -9 of a gateway in the middle of a burst: nothing lost, nothing stuck, nothing oversold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.helpers import Shop, as_text, check_invariant, wait_for
from tests.processes import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STOCK = 40


@pytest.mark.parametrize("forward", ["sync", "queue"])
async def test_kill_9_mid_burst_then_restart(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    shop: Shop,
    forward: str,
) -> None:
    accepted: set[str] = set()

    async def slow_idempotent_backend(request: web.Request) -> web.StreamResponse:
        # The backend takes the order when it arrives and answers the same for a redelivery.
        accepted.add(request.headers["X-Reservation-Id"])
        await asyncio.sleep(0.5)  # the backend's own slowness: orders are in flight at the kill
        return web.json_response({"order": request.headers["X-Reservation-Id"]}, status=201)

    shop.respond = slow_idempotent_backend
    process_config["upstreams"]["shop"]["timeout"] = 1.0
    process_config["campaigns"][0].update(
        stock=STOCK,
        forward=forward,
        forward_deadline="2s",
        max_inflight=8,
        retry_backoff="100ms",
        max_retry_backoff="500ms",
    )
    victim = run_gateway(process_config, "--workers", "1")
    survivor = run_gateway(process_config, "--workers", "1")
    outcomes = await _burst_with_a_kill(victim, survivor, accepted, buyers=300)
    victim.start()  # the same ports, a new process
    await wait_for(lambda: _settled(redis), within=30)
    victim.stop()
    survivor.stop()

    state = await check_invariant(redis, "phone-1111", per_user_limit=1)
    assert state["reserved"] == 0
    assert state["sold"] <= STOCK
    committed = await _committed(redis)
    # every order the backend took is counted as sold, and nothing else is
    assert committed == accepted, (len(committed), len(accepted))
    assert state["sold"] == len(accepted)
    print(f"{forward}: sold {state['sold']} of {STOCK}; client outcomes {outcomes}")


async def _burst_with_a_kill(
    victim: GatewayProcess, survivor: GatewayProcess, accepted: set[str], buyers: int
) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    users = iter(range(buyers))

    async def buyer(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        for i in users:
            for target in (gateway, survivor):  # a lost connection: try the other gateway
                try:
                    async with session.post(
                        f"{target.url}/seckill/phone-1111", headers={"X-User-Id": f"buyer-{i}"}
                    ) as response:
                        await response.read()
                        key = str(response.status)
                        break
                except aiohttp.ClientError:
                    key = "connection lost"
            outcomes[key] = outcomes.get(key, 0) + 1

    async with aiohttp.ClientSession() as session:
        crowd = [asyncio.ensure_future(buyer(session, g)) for g in (victim, survivor) * 15]
        await wait_for(lambda: len(accepted) >= 10)  # orders are in flight to the slow backend
        victim.kill()
        await asyncio.gather(*crowd)
    return outcomes


async def _settled(redis: Redis) -> bool:
    state = as_text(await redis.hgetall("fg:{phone-1111}:state"))
    return state.get("reserved") == "0"


async def _committed(redis: Redis) -> set[str]:
    committed = set()
    async for key in redis.scan_iter(match="fg:{phone-1111}:r:*", count=1000):
        record = as_text(await redis.hgetall(key))
        if record["state"] == "committed":
            committed.add("phone-1111." + key.decode().rsplit(":", 1)[1])
    return committed
