"""The waiting room for operators: the admin API and ``flashgate status`` show the queue,
/metrics exports it (from Redis, campaign label only), a reload keeps what a process
knows of its waiters, and the page is served with a strict CSP."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from gateway.operations.status import render_status, status
from tests.helpers import AUTH, OpenGateway, settings_for, wait_for
from tests.waiting_room_helpers import QUEUE, Waiter, with_room

pytestmark = pytest.mark.integration


async def test_the_admin_api_shows_the_queue(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    settings_data["campaigns"][0]["stock"] = 2
    with_room(settings_data, max_passes_per_unit=1, close_factor=2)
    async with new_gateway() as gw:
        for i in range(6):
            await Waiter(gw, f"user-{i}").join()

        async def issued() -> bool:
            return bool((await gw.campaign())["waiting_room"]["passes_issued"] == 2)

        await wait_for(issued)
        room = (await gw.campaign())["waiting_room"]
        assert room["waiting"] == 2
        assert (room["passes_outstanding"], room["passes_cap"], room["available"]) == (2, 2, 2)
        assert (room["joined"], room["closed"], room["close_beyond"]) == (6, 2, 4)
        assert room["process"]["joins"] == 6
        listed = await gw.admin.get("/campaigns", headers=AUTH)
        assert (await listed.json())["campaigns"][0]["waiting_room"]["waiting"] == 2


async def test_a_campaign_without_a_waiting_room_shows_none(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    async with new_gateway() as gw:
        assert "waiting_room" not in await gw.campaign()
        response = await gw.edge.get(QUEUE, headers={"X-User-Id": "alice"})
        assert response.status == 404


async def test_metrics_export_the_queue_by_campaign(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, admit_rate=0.001)
    async with new_gateway() as gw:

        async def scrape() -> dict[str, float]:
            gw.runtime.publisher.flush()
            text = await (await gw.admin.get("/metrics")).text()
            return {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("flashgate_waiting_room") and "phone-1111" in line
            }

        before = await scrape()
        waiter = Waiter(gw, "alice")
        await waiter.join()
        await waiter.poll()

        async def counted() -> bool:
            return (await scrape()).get(
                'flashgate_waiting_room_waiting{campaign="phone-1111"}'
            ) == 1

        await wait_for(counted)
        after = await scrape()
        assert after['flashgate_waiting_room_joins_total{campaign="phone-1111"}'] == 1
        polls = 'flashgate_waiting_room_polls_total{campaign="phone-1111"}'
        assert after[polls] - before.get(polls, 0) == 1  # this process's registry is shared
        for series in after:
            labels = series[series.index("{") + 1 : series.index("}")]
            assert {kv.split("=")[0] for kv in labels.split(",")} <= {"campaign", "le"}


async def test_status_shows_the_queue(
    settings_data: dict[str, Any],
    new_gateway: OpenGateway,
    redis: Redis,
    redis_server: EmbeddedRedis,
) -> None:
    with_room(settings_data, admit_rate=0.001)
    async with new_gateway() as gw:
        for user in ("alice", "bob"):
            await Waiter(gw, user).join()
        rows = await status(settings_for(settings_data), redis_server.url)
        assert rows[0]["waiting_room"]["waiting"] == 2
        text = render_status(rows)
        assert "waiting rooms" in text
        header, _, row = text.split("waiting rooms\n")[1].splitlines()[:3]
        assert header.split()[:2] == ["campaign", "waiting"]
        assert row.split()[:2] == ["phone-1111", "2"]


@pytest.mark.e2e
async def test_the_status_command_prints_the_queue_as_json(
    settings_data: dict[str, Any],
    new_gateway: OpenGateway,
    redis: Redis,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
) -> None:
    with_room(settings_data, admit_rate=0.001)
    config = {**settings_data, "redis": {"url": redis_server.url}}
    path = tmp_path / "flashgate.yaml"
    path.write_text(yaml.safe_dump(config))
    async with new_gateway() as gw:
        await Waiter(gw, "alice").join()
        command = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "gateway", "status", "-c", str(path), "--json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(command.communicate(), 30)
    assert command.returncode == 0, err.decode()
    (campaign,) = json.loads(out)["campaigns"]
    assert campaign["waiting_room"]["waiting"] == 1


async def test_a_reload_keeps_what_the_process_knows_of_its_waiters(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, admit_rate=0.001, heartbeat="60s")
    async with new_gateway() as gw:
        waiters = [Waiter(gw, f"user-{i}") for i in range(3)]
        for waiter in waiters:
            await waiter.join()
        with_room(settings_data, admit_rate=0.002, heartbeat="60s")
        await gw.runtime.apply(settings_for(settings_data))
        room = gw.runtime.snapshot.campaigns["phone-1111"].room
        assert room is not None
        assert room.settings.admit_rate == 0.002
        await wait_for(lambda: room.view is not None and room.view.length == 3)
        assert [(await w.poll())[1]["position"] for w in waiters] == [1, 2, 3]
        assert room.memory.counts["redis_checks"] == 0


async def test_a_reload_can_add_a_waiting_room(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    async with new_gateway() as gw:
        assert (await gw.buy("alice")).status == 201
        with_room(settings_data)
        await gw.runtime.apply(settings_for(settings_data))
        assert (await gw.buy("bob")).status == 403
        status, joined = await Waiter(gw, "bob").join()
        assert (status, joined["state"]) == (202, "waiting")


async def test_the_page_is_served_with_a_strict_content_security_policy(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, proof_of_work={"difficulty": 8})
    async with new_gateway() as gw:
        response = await gw.edge.get(f"{QUEUE}/page")
        assert response.status == 200
        assert response.content_type == "text/html"
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'sha256-" in policy
        assert "connect-src 'self'" in policy
        page = await response.text()
        assert "<script src" not in page  # nothing from elsewhere
        assert '"proof_of_work": true' in page
        assert '"buy_path": "/seckill/phone-1111"' in page


async def test_a_shop_on_another_origin_may_use_the_waiting_room(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    origin = "https://shop.example"
    settings_data["gateway"]["cors"] = {"allow_origins": [origin]}
    with_room(settings_data)
    preflight = {"Origin": origin, "Access-Control-Request-Headers": "content-type, x-user-id"}
    async with new_gateway() as gw:
        joining = await gw.edge.options(
            QUEUE, headers={**preflight, "Access-Control-Request-Method": "POST"}
        )
        assert joining.status == 204
        assert joining.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
        buying = await gw.edge.options(
            "/seckill/phone-1111",
            headers={
                **preflight,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-queue-pass, x-user-id, idempotency-key",
            },
        )
        assert buying.status == 204
        allowed = buying.headers["Access-Control-Allow-Headers"].lower()
        assert "x-queue-pass" in allowed
        status, joined = await Waiter(gw, "alice").join()
        assert status == 202
        response = await gw.edge.get(
            QUEUE,
            params={"ticket": joined["ticket"]},
            headers={"X-User-Id": "alice", "Origin": origin},
        )
        assert response.headers["Access-Control-Allow-Origin"] == origin
