"""Slow and greedy clients on a real edge server (the one ``flashgate run`` serves):
thousands of connections dribbling their request head are closed by the header
deadline while connected buyers are served; per-address and per-process caps refuse
cleanly. Outcomes are checked, never durations."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from gateway.config import Settings
from gateway.core.runtime import Runtime
from gateway.edge.connections import GuardedServer, connection_budget
from gateway.edge.server import create_server
from gateway.embedded.server import EmbeddedRedis
from gateway.process.serve import BACKLOG, edge_parts
from tests.helpers import settings_for

pytestmark = pytest.mark.integration

HEAD = b"POST /seckill/phone-1111 HTTP/1.1\r\nHost: shop\r\n"
BUY = HEAD + b"X-User-Id: %s\r\nContent-Length: 0\r\n\r\n"


class Edge:
    def __init__(self, server: GuardedServer, port: int) -> None:
        self.server = server
        self.port = port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def buy(
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, user: str
    ) -> int:
        """One purchase on an open keep-alive connection; its status."""
        writer.write(BUY % user.encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return status


@pytest.fixture
def edge_server(
    redis: Redis, redis_server: EmbeddedRedis, settings_data: dict[str, Any]
) -> Callable[[], contextlib.AbstractAsyncContextManager[Edge]]:
    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[Edge]:
        settings = settings_for(settings_data)
        async with Runtime.open(settings, redis_server.url, dispatch=False) as runtime:
            server = create_server(edge_parts(runtime))
            assert isinstance(server, GuardedServer)
            runner = web.ServerRunner(server, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=BACKLOG)
            await site.start()
            try:
                yield Edge(server, runner.addresses[0][1])
            finally:
                await runner.cleanup()

    return start


async def _dribble(edge: Edge, stop: asyncio.Event) -> bytes:
    """A client sending its head one line at a time; what the server said before closing."""
    reader, writer = await edge.connect()
    try:
        writer.write(HEAD)
        i = 0
        while not stop.is_set():
            read = asyncio.ensure_future(reader.read())
            done, _ = await asyncio.wait({read}, timeout=0.3)
            if done:
                try:
                    return read.result()
                except ConnectionResetError:  # closed while a line was on its way: a reset
                    return b"reset"
            read.cancel()
            writer.write(b"X-Dribble-%d: x\r\n" % i)
            i += 1
        return b"still open"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_dribbling_heads_are_closed_by_the_deadline_while_buyers_are_served(
    edge_server: Callable[[], contextlib.AbstractAsyncContextManager[Edge]],
    settings_data: dict[str, Any],
) -> None:
    settings_data["gateway"].update({"header_timeout": "1s", "keepalive_timeout": "5s"})
    settings_data["campaigns"][0]["stock"] = 100
    count = 2000
    async with edge_server() as edge:
        # a buyer connected before the crowd, on a kept-alive connection
        reader, writer = await edge.connect()
        assert await edge.buy(writer, reader, "early") == 201
        stop = asyncio.Event()
        crowd = []
        for _ in range(0, count, 250):  # bounded: the backlog takes them in batches
            crowd += [asyncio.ensure_future(_dribble(edge, stop)) for _i in range(250)]
            await asyncio.sleep(0)
        # while they dribble, the connected buyer and a newcomer are served
        assert await edge.buy(writer, reader, "connected") == 201
        fresh_reader, fresh_writer = await edge.connect()
        assert await edge.buy(fresh_writer, fresh_reader, "newcomer") == 201
        try:
            async with asyncio.timeout(60):  # a bound on the test, not a measurement
                answers = await asyncio.gather(*crowd)
        finally:
            stop.set()
        # the server let go of every dribbler; the two buyers' connections remain
        for _ in range(500):
            if edge.server.open_connections == 2:
                break
            await asyncio.sleep(0.01)
        assert edge.server.open_connections == 2
        for w in (writer, fresh_writer):
            w.close()
        assert len(answers) == count
        # every one was closed by the server: answered 408, or closed or reset when its
        # next line crossed the close (the kernel then drops the answer); none left open
        told = [a for a in answers if a.startswith(b"HTTP/1.1 408 ")]
        closed = answers.count(b"") + answers.count(b"reset")
        assert len(told) + closed == count, {a[:40] for a in answers}
        assert all(b'"code":"request-timeout"' in a for a in told)
        assert told, "no client read its 408"
        assert edge.server.refusals["head"] == count


async def test_a_client_over_its_connection_cap_is_refused(
    edge_server: Callable[[], contextlib.AbstractAsyncContextManager[Edge]],
    settings_data: dict[str, Any],
) -> None:
    settings_data["gateway"]["max_connections_per_ip"] = 3
    async with edge_server() as edge:
        held = [await edge.connect() for _ in range(3)]
        reader, writer = await edge.connect()
        answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 429 ")
        assert b'"code":"too-many-connections"' in answer
        writer.close()
        # one of the three is still served, and closing one makes room
        assert await edge.buy(held[0][1], held[0][0], "alice") == 201
        held[1][1].close()
        await held[1][1].wait_closed()
        for _ in range(100):  # until the server has seen it go
            if edge.server.per_ip["127.0.0.1"] < 3:
                break
            await asyncio.sleep(0.01)
        again_reader, again_writer = await edge.connect()
        assert await edge.buy(again_writer, again_reader, "bob") == 201
        for _, w in (held[0], held[2], (again_reader, again_writer)):
            w.close()


async def test_a_trusted_proxy_is_not_capped(
    edge_server: Callable[[], contextlib.AbstractAsyncContextManager[Edge]],
    settings_data: dict[str, Any],
) -> None:
    settings_data["gateway"].update(
        {"max_connections_per_ip": 1, "trusted_proxies": ["127.0.0.1/32"]}
    )
    async with edge_server() as edge:
        connections = [await edge.connect() for _ in range(3)]
        for i, (r, w) in enumerate(connections):
            assert await edge.buy(w, r, f"user-{i}") == 201
            w.close()


async def test_at_the_process_cap_new_connections_get_503_and_connected_buyers_are_served(
    edge_server: Callable[[], contextlib.AbstractAsyncContextManager[Edge]],
    settings_data: dict[str, Any],
) -> None:
    settings_data["gateway"]["max_connections"] = 20
    async with edge_server() as edge:
        held = [await edge.connect() for _ in range(20)]
        refused = [await edge.connect() for _ in range(5)]
        for reader, writer in refused:
            answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"Retry-After: 1" in answer
            writer.close()
        assert edge.server.refusals["full"] == 5
        for i, (reader, writer) in enumerate(held[:5]):
            assert await edge.buy(writer, reader, f"held-{i}") == 201
        for _, writer in held:
            writer.close()


def test_the_default_budget_leaves_room_for_redis_and_the_backends(
    settings_data: dict[str, Any],
) -> None:
    settings: Settings = settings_for(settings_data)
    assert connection_budget(settings, soft_limit=65536) == 65536 - 128 - 68 - 16 - 256
    assert connection_budget(settings, soft_limit=1024) == 1024 - 128 - 68 - 16 - 256
    assert connection_budget(settings, soft_limit=256) == 64  # a quarter at least
    settings_data["gateway"]["max_connections"] = 5000
    assert connection_budget(settings_for(settings_data), soft_limit=1024) == 5000
