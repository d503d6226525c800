"""The gateway's own HTTP/1.1 client (gateway/http1.py) against real servers on
loopback: aiohttp for well-formed answers, a raw asyncio server for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager as AsyncContextManager

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.embedded.server import free_port
from gateway.forwarding.http1 import Http1Client, HttpFailure, NotSent, RawReply, TooLarge
from tests.helpers import TlsFiles

MAX_BODY = 1024


class Backend:
    """An aiohttp backend that counts connections and concurrent requests."""

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.busy = 0
        self.most_busy = 0
        self.seen: list[web.Request] = []
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.seen.append(request)
        self.bodies.append(await request.read())
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            if request.path == "/slow":
                await asyncio.sleep(float(request.query.get("s", "0.05")))
            if request.path == "/chunked":
                response = web.StreamResponse(headers={"X-Kind": "chunked"})
                response.enable_chunked_encoding()
                await response.prepare(request)
                for part in (b"one,", b"two,", b"three"):
                    await response.write(part)
                await response.write_eof()
                return response
            if request.path == "/close":
                return web.Response(text="bye", headers={"Connection": "close"})
            if request.path == "/big":
                return web.Response(body=b"x" * (MAX_BODY + 1))
            if request.path == "/empty":
                return web.Response(status=204)
            return web.Response(
                status=201, text=f"{request.method} {request.path_qs}", headers={"X-Echo": "yes"}
            )
        finally:
            self.busy -= 1


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    shop = Backend()
    server = TestServer(shop.app(), host="127.0.0.1")
    await server.start_server()
    yield shop, str(server.make_url("")).rstrip("/")
    await server.close()


@contextlib.asynccontextmanager
async def client_of(url: str, max_connections: int = 8) -> AsyncIterator[Http1Client]:
    client = Http1Client(url, max_connections=max_connections, max_body=MAX_BODY)
    try:
        yield client
    finally:
        await client.close()


async def call(
    client: Http1Client,
    path: str,
    method: str = "POST",
    body: bytes = b"{}",
    headers: list[tuple[str, str]] | None = None,
    within: float = 2.0,
) -> RawReply:
    encoded = client.encode(method, path, headers or [("X-User-Id", "u1")], body)
    return await client.send(method, encoded, within)


async def test_requests_reuse_one_keep_alive_connection(backend: tuple[Backend, str]) -> None:
    shop, url = backend
    async with client_of(url) as client:
        for i in range(20):
            answer = await call(client, f"/orders?i={i}", body=b'{"n":1}')
            assert answer.status == 201
            assert answer.body == f"POST /orders?i={i}".encode()
            assert ("X-Echo", "yes") in answer.headers
    assert len(shop.peers) == 1
    assert shop.bodies == [b'{"n":1}'] * 20
    request = shop.seen[0]
    assert request.headers["X-User-Id"] == "u1"
    assert request.headers["Host"] == url.removeprefix("http://")
    assert request.headers["Content-Length"] == "7"


async def test_a_base_path_and_a_configured_host_are_used(backend: tuple[Backend, str]) -> None:
    shop, url = backend
    async with client_of(url + "/api/v1") as client:
        answer = await call(client, "/orders", headers=[("Host", "shop.example")])
    assert answer.body == b"POST /api/v1/orders"
    assert shop.seen[0].headers["Host"] == "shop.example"


async def test_past_its_cap_the_pool_makes_requests_wait_not_fail(
    backend: tuple[Backend, str],
) -> None:
    shop, url = backend
    async with client_of(url, max_connections=2) as client:
        answers = await asyncio.gather(*(call(client, "/slow?s=0.02") for _ in range(30)))
    assert {a.status for a in answers} == {201}
    assert shop.most_busy <= 2
    assert len(shop.peers) <= 2


async def test_a_request_that_gets_no_connection_in_time_is_not_sent_and_the_pool_recovers(
    backend: tuple[Backend, str],
) -> None:
    shop, url = backend
    async with client_of(url, max_connections=1) as client:
        slow = asyncio.create_task(call(client, "/slow?s=0.5"))
        await asyncio.sleep(0.05)
        with pytest.raises(NotSent, match=r"no connection .* \(1 in use or opening\)"):
            await call(client, "/orders", within=0.4)  # waited 0.2 s: half its budget
        assert (await slow).status == 201
        assert [r.path for r in shop.seen] == ["/slow"]  # the second never reached it
        assert (await call(client, "/orders")).status == 201
        assert client._open == 1  # the slot accounting survived
    assert len(shop.peers) == 1


async def test_a_timed_out_connection_is_never_reused(backend: tuple[Backend, str]) -> None:
    shop, url = backend
    async with client_of(url) as client:
        with pytest.raises(TimeoutError):
            await call(client, "/slow?s=0.3", within=0.05)
        answer = await call(client, "/orders")  # not the late answer of /slow
        assert answer.body == b"POST /orders"
    assert len(shop.peers) == 2


async def test_chunked_close_and_bodiless_answers(backend: tuple[Backend, str]) -> None:
    shop, url = backend
    async with client_of(url) as client:
        chunked = await call(client, "/chunked")
        assert (chunked.status, chunked.body) == (200, b"one,two,three")
        closing = await call(client, "/close")
        assert closing.body == b"bye"
        empty = await call(client, "/empty")
        assert (empty.status, empty.body) == (204, b"")
        head = await call(client, "/orders", method="HEAD", body=b"")
        assert (head.status, head.body) == (201, b"")
        assert (await call(client, "/orders")).status == 201
    # chunked and 204 and HEAD kept their connection; "Connection: close" did not
    assert len(shop.peers) == 2


async def test_an_oversized_answer_is_refused(backend: tuple[Backend, str]) -> None:
    _, url = backend
    async with client_of(url) as client:
        with pytest.raises(TooLarge, match=f"more than {MAX_BODY} bytes"):
            await call(client, "/big")
        assert (await call(client, "/orders")).status == 201


async def test_a_line_break_in_a_header_is_refused_before_sending(
    backend: tuple[Backend, str],
) -> None:
    shop, url = backend
    async with client_of(url) as client:
        with pytest.raises(HttpFailure, match="line break"):
            client.encode("POST", "/orders", [("X-Evil", "a\r\nX-Injected: 1")], b"")
    assert shop.seen == []


async def test_no_backend_is_a_failure_not_a_hang() -> None:
    async with client_of(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(HttpFailure, match="cannot connect"):
            await call(client, "/orders")


# --- answers only a raw server sends


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handle: Handler) -> AsyncIterator[str]:
    """A server on loopback running ``handle`` for each connection; every connection is
    closed and every handler finished when the block ends."""
    serving: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        serving.add(task)
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))


def raw_server(answer: bytes, *, then_close: bool = False) -> AsyncContextManager[str]:
    """A server that answers every request with ``answer``, byte for byte."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
            if then_close:
                return

    return tcp_server(handle)


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", 200, b"until the end"),  # then it closes
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            201,
            b"ok",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
            200,
            b"abcde",
        ),
        (b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n", 409, b""),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            200,
            b"ok",
        ),
    ],
    ids=[
        "http/1.0-until-close",
        "100-continue",
        "chunked-with-trailers",
        "empty-body",
        "chunked-wins-over-length",
    ],
)
async def test_answers_framed_every_legal_way_are_read(
    answer: bytes, status: int, body: bytes
) -> None:
    until_close = answer.startswith(b"HTTP/1.0")
    async with raw_server(answer, then_close=until_close) as url, client_of(url) as client:
        for _ in range(2):  # and again, on the same or a new connection
            got = await call(client, "/orders")
            assert (got.status, got.body) == (status, body)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "not HTTP/1.x"),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "not HTTP/1.x"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "invalid Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "transfer coding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            "longer than announced",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "more than 1024 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "lost|closed"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "answered 101"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9, "answered 100"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not HTTP/1.x"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n", "oversized head"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n", "bad chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"X-T: "
            + b"t" * 70_000
            + b"\r\n",
            "oversized trailers",
        ),
        (b"", "closed the connection before answering|lost"),
    ],
    ids=[
        "not-http",
        "bad-status",
        "header-without-colon",
        "negative-length",
        "conflicting-lengths",
        "gzip-coding",
        "bad-chunk-size",
        "chunk-too-long",
        "declared-too-large",
        "truncated-body",
        "upgrade",
        "endless-1xx",
        "four-digit-status",
        "non-ascii-digit-length",
        "oversized-head-in-one-read",
        "negative-chunk-size",
        "hex-prefixed-chunk-size",
        "oversized-trailers",
        "no-answer",
    ],
)
async def test_a_broken_answer_is_a_failure_and_the_connection_is_dropped(
    answer: bytes, reason: str
) -> None:
    async with raw_server(answer, then_close=True) as url, client_of(url) as client:
        with pytest.raises(HttpFailure, match=reason):
            await call(client, "/orders")
        assert client._idle == []  # nothing broken is kept
        assert client._open == 0


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answer, then_close=True) as url, client_of(url) as client:
        for _ in range(3):
            assert (await call(client, "/orders")).body == b"ok"
            await asyncio.sleep(0.05)  # the server's close reaches the idle connection


@contextlib.asynccontextmanager
async def tls_backend(tls_files: TlsFiles) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    server = TestServer(Backend().app(), host="127.0.0.1")
    await server.start_server(ssl=context)
    try:
        yield f"https://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_https_backends_are_verified_against_the_trusted_authorities(
    tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_backend(tls_files) as url:
        async with client_of(url) as client:  # the test CA is not trusted
            with pytest.raises(HttpFailure, match="certificate verify failed"):
                await call(client, "/orders")
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))  # now it is
        async with client_of(url) as client:
            answer = await call(client, "/orders")
            assert (answer.status, answer.body) == (201, b"POST /orders")


async def test_a_waiter_handed_a_connection_the_backend_then_closed_opens_a_new_one() -> None:
    # keep-alive answers, but the server closes after each: a waiter handed the
    # released connection finds it closed by the time it runs, and must not use it
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answer, then_close=True) as url, client_of(url, 1) as client:
        answers = await asyncio.gather(*(call(client, f"/orders?i={i}") for i in range(6)))
        assert [a.body for a in answers] == [b"ok"] * 6
        assert client._open <= 1


async def test_a_timed_out_request_keeps_its_slot_while_the_backend_runs_it(
    backend: tuple[Backend, str],
) -> None:
    shop, url = backend
    async with client_of(url, max_connections=1) as client:
        with pytest.raises(TimeoutError):
            await call(client, "/slow?s=0.3", within=0.1)
        answer = await call(client, "/orders", within=2.0)  # waits for the slot
        assert answer.status == 201
    assert shop.most_busy == 1  # the backend never ran two at once


@contextlib.asynccontextmanager
async def closes_reused_connections() -> AsyncIterator[tuple[str, list[int]]]:
    """Answers the first request on each connection; closes on the second without a
    word, as a server closing an idle keep-alive connection does."""
    received: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = 0
        while number < 2:
            await read_request(reader)
            number += 1
            received.append(number)
            if number == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    async with tcp_server(handle) as url:
        yield url, received


async def test_a_request_on_a_reused_connection_the_backend_closed_unanswered_goes_again() -> None:
    async with closes_reused_connections() as (url, received), client_of(url) as client:
        assert (await call(client, "/first", body=b"")).body == b"ok"
        assert (await call(client, "/second", body=b"")).body == b"ok"  # sent again, anew
    assert received == [1, 2, 1]  # the dropped second, then the second on a new connection
