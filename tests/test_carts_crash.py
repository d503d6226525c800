"""kill -9 of a gateway while it reserves and forwards carts: the survivor's sweeper
rolls back the orders left half-reserved, delivers again the ones left unanswered, and
afterwards every order is whole (all its items in its state) and every book balances."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.helpers import Shop, as_text, check_invariant, order_ids, text, wait_for
from tests.processes import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PHONE, CASE = "phone-1111", "case-1111"
ITEMS = {"items": [{"campaign": PHONE, "quantity": 1}, {"campaign": CASE, "quantity": 1}]}


async def test_kill_9_mid_cart_leaves_every_order_whole(
    process_config: dict[str, Any],
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    shop: Shop,
) -> None:
    accepted: set[str] = set()

    async def slow_idempotent_backend(request: web.Request) -> web.StreamResponse:
        accepted.add(request.headers["X-Reservation-Id"])
        await asyncio.sleep(0.3)  # orders are in flight at the kill
        return web.json_response({"order": request.headers["X-Reservation-Id"]}, status=201)

    shop.respond = slow_idempotent_backend
    process_config["redis"]["timeout"] = "100ms"  # a half-reserved order waits 2 s
    process_config["upstreams"]["shop"]["timeout"] = 1.0
    process_config["campaigns"][0].update(stock=40, per_user_limit=1)
    process_config["campaigns"].append(
        {"id": CASE, "route": f"POST /seckill/{CASE}", "upstream": "shop", "stock": 30}
    )
    process_config["carts"] = [
        {
            "id": "bundle",
            "route": "POST /seckill/bundle",
            "upstream": "shop",
            "campaigns": [PHONE, CASE],
            "forward_deadline": "2s",
        }
    ]
    victim = run_gateway(process_config, "--workers", "1")
    survivor = run_gateway(process_config, "--workers", "1")
    await _burst_with_a_kill(victim, survivor, accepted, buyers=400)
    await wait_for(lambda: _all_settled(redis), within=30)
    survivor.stop()

    phone = await check_invariant(redis, PHONE, 1)
    case = await check_invariant(redis, CASE, 1)
    assert phone["reserved"] == case["reserved"] == 0
    orders = await _orders(redis)
    committed = {oid for oid, o in orders.items() if o["state"] == "committed"}
    # every order the backend took is sold whole, and nothing else is
    assert committed == accepted, (len(committed), len(accepted))
    assert phone["sold"] == case["sold"] == len(committed)
    for order_id, order in orders.items():
        states = await _item_states(redis, order["items"])
        if order["state"] == "committed":
            assert states == {"committed"}, (order_id, order, states)
        else:
            assert order["state"] == "released", (order_id, order)
            assert states <= {"released", "expired", "cancelled", None}, (order_id, states)
    print(f"cart orders: {len(orders)}; committed {len(committed)}")


async def _burst_with_a_kill(
    victim: GatewayProcess, survivor: GatewayProcess, accepted: set[str], buyers: int
) -> None:
    users = iter(range(buyers))

    async def buyer(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        for i in users:
            for target in (gateway, survivor):  # a lost connection: try the other gateway
                try:
                    async with session.post(
                        f"{target.url}/seckill/bundle",
                        json=ITEMS,
                        headers={"X-User-Id": f"buyer-{i}"},
                    ) as response:
                        await response.read()
                        break
                except aiohttp.ClientError:
                    pass

    async with aiohttp.ClientSession() as session:
        crowd = [asyncio.ensure_future(buyer(session, g)) for g in (victim, survivor) * 15]
        await wait_for(lambda: len(accepted) >= 8)  # orders are in flight to the slow backend
        victim.kill()
        await asyncio.gather(*crowd)


async def _orders(redis: Redis) -> dict[str, dict[str, str]]:
    found = {}
    for order_id in await order_ids(redis):
        token = order_id.rsplit(".", 1)[1]
        found[order_id] = as_text(
            dict(
                zip(
                    ("state", "items", "applied"),
                    await redis.hmget(f"fg:{{bundle}}:r:{token}", "state", "items", "applied"),
                    strict=True,
                )
            )
        )
    return found


async def _all_settled(redis: Redis) -> bool:
    orders = await _orders(redis)
    return bool(orders) and all(
        o["state"] in ("committed", "released") and o["applied"] == "1" for o in orders.values()
    )


async def _item_states(redis: Redis, items: str) -> set[str | None]:
    states: set[str | None] = set()
    for part in items.split(","):
        campaign, _, rest = part.partition("=")
        token = rest.rpartition(":")[0].rsplit(".", 1)[1]
        state = await redis.hget(f"fg:{{{campaign}}}:r:{token}", "state")
        states.add(text(state) if state else None)
    return states
