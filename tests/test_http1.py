"""The gateway's own HTTP/1.1 client (gateway/forwarding/http1.py) against real servers
on loopback: aiohttp for well-formed answers, a raw asyncio server for the rest."""

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
        (b"HTTP/1.1 201\r\nContent-Length: 2\r\n\r\nok", 201, b"ok"),
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            200,
            b"ok",
        ),
        (b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ],
    ids=[
        "http/1.0-until-close",
        "100-continue",
        "chunked-with-trailers",
        "empty-body",
        "no-reason-phrase",
        "103-early-hints",
        "empty-line-before-the-status-line",
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
        (b"SPDY/3 200 OK\r\n\r\n", "Expected HTTP/"),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "Invalid status code"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "Invalid header token"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "Invalid character in Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "Duplicate Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "transfer coding"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "Invalid character in chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            "Expected LF after chunk data",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "more than 1024 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "lost|closed"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "answered 101"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9, "answered 100"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "Invalid response status"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
            "Invalid character in Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n", "oversized head"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n",
            "Invalid character in chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n",
            "Invalid character in chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"X-T: "
            + b"t" * 70_000
            + b"\r\n\r\n",
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


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CHUNKED_HEAD = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
#: Answers a backend must never be believed on, each with the reason the client gives:
#: llhttp's own words where llhttp refused it, ours where llhttp accepts it. None ends
#: short: each is refused on its bytes, with the connection still open.
MALFORMED_ANSWERS: dict[str, tuple[bytes, str]] = {
    "bare-lf-in-a-value": (
        OK_HEAD + b"X-A: a\nSet-Cookie: x\r\nContent-Length: 2\r\n\r\nok",
        "Missing expected CR after header value",
    ),
    "bare-cr-in-a-value": (
        OK_HEAD + b"X-A: a\rSet-Cookie: x\r\nContent-Length: 2\r\n\r\nok",
        "Missing expected LF after header value",
    ),
    "bare-lf-line-endings": (
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        "Missing expected CR after response line",
    ),
    "nul-in-a-value": (
        OK_HEAD + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        "Invalid header value char",
    ),
    "control-char-in-a-value": (
        OK_HEAD + b"X-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        "Invalid header value char",
    ),
    "space-in-a-name": (
        OK_HEAD + b"Bad Name: x\r\nContent-Length: 2\r\n\r\nok",
        "Invalid header token",
    ),
    "control-char-in-a-name": (
        OK_HEAD + b"X\x01: y\r\nContent-Length: 2\r\n\r\nok",
        "Invalid header token",
    ),
    "space-before-the-colon": (
        OK_HEAD + b"X-A : y\r\nContent-Length: 2\r\n\r\nok",
        "Invalid header token",
    ),
    "empty-name": (OK_HEAD + b": y\r\nContent-Length: 2\r\n\r\nok", "Invalid header token"),
    "obs-fold": (
        OK_HEAD + b"X-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        "Unexpected whitespace after header value",
    ),
    "obs-fold-with-a-tab": (
        OK_HEAD + b"X-A: a\r\n\tb\r\nContent-Length: 2\r\n\r\nok",
        "Unexpected whitespace after header value",
    ),
    "four-digit-status": (
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        "Invalid response status",
    ),
    "http/2-status-line": (b"HTTP/2 200\r\nContent-Length: 2\r\n\r\nok", "Expected dot"),
    "misspelt-protocol": (b"HTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "Expected HTTP/"),
    "http/1.2": (b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok", "Invalid HTTP version"),
    "http/2.0": (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "not HTTP/1.x"),
    "http/0.9": (b"HTTP/0.9 200 OK\r\nContent-Length: 2\r\n\r\nok", "not HTTP/1.x"),
    "status-below-100": (b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok", "status 99"),
    "status-above-599": (b"HTTP/1.1 600 OK\r\nContent-Length: 2\r\n\r\nok", "status 600"),
    "conflicting-lengths": (
        OK_HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "Duplicate Content-Length",
    ),
    "repeated-length": (
        OK_HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        "Duplicate Content-Length",
    ),
    "listed-lengths": (
        OK_HEAD + b"Content-Length: 2, 2\r\n\r\nok",
        "Invalid character in Content-Length",
    ),
    "negative-length": (
        OK_HEAD + b"Content-Length: -2\r\n\r\nok",
        "Invalid character in Content-Length",
    ),
    "hex-length": (
        OK_HEAD + b"Content-Length: 0x2\r\n\r\nok",
        "Invalid character in Content-Length",
    ),
    "empty-length": (OK_HEAD + b"Content-Length: \r\n\r\nok", "Empty Content-Length"),
    "length-then-chunked": (
        OK_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "can't be present with",
    ),
    "chunked-then-length": (
        OK_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "can't be present with",
    ),
    "chunked-twice": (
        OK_HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "transfer coding",
    ),
    "chunked-not-last": (
        OK_HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\nok",
        "transfer coding",
    ),
    "non-hex-chunk-size": (CHUNKED_HEAD + b"zz\r\nok\r\n0\r\n\r\n", "Invalid character in chunk"),
    "negative-chunk-size": (CHUNKED_HEAD + b"-2\r\nok\r\n0\r\n\r\n", "Invalid character in chunk"),
    "hex-prefixed-chunk-size": (
        CHUNKED_HEAD + b"0x2\r\nok\r\n0\r\n\r\n",
        "Invalid character in chunk",
    ),
    "space-after-chunk-size": (
        CHUNKED_HEAD + b"2 \r\nok\r\n0\r\n\r\n",
        "Invalid character in chunk",
    ),
    "overflowing-chunk-size": (
        CHUNKED_HEAD + b"1" + b"0" * 17 + b"\r\nok\r\n",
        "Chunk size overflow",
    ),
    "bare-lf-after-chunk-size": (
        CHUNKED_HEAD + b"2\nok\r\n0\r\n\r\n",
        "Missing expected CR after chunk size",
    ),
    "chunk-longer-than-announced": (
        CHUNKED_HEAD + b"2\r\nabc\r\n0\r\n\r\n",
        "Expected LF after chunk data",
    ),
    "bare-lf-in-a-trailer": (
        CHUNKED_HEAD + b"0\r\nX-T: a\nSet-Cookie: x\r\n\r\n",
        "Missing expected CR after header value",
    ),
    "oversized-head": (
        OK_HEAD + b"X-Big: " + b"x" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok",
        "oversized head",
    ),
    "many-headers-oversized-head": (
        OK_HEAD + b"X-Many: 0123456789\r\n" * 4000 + b"Content-Length: 2\r\n\r\nok",
        "oversized head",
    ),
    "endless-head": (OK_HEAD + b"X-Big: " + b"x" * 200_000, "oversized head"),
    "oversized-trailers": (
        CHUNKED_HEAD + b"0\r\nX-T: " + b"t" * 70_000 + b"\r\n\r\n",
        "oversized trailers",
    ),
    "endless-trailer": (CHUNKED_HEAD + b"0\r\nX-T: " + b"t" * 200_000, "oversized trailers"),
    "switching-protocols": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        "answered 101",
    ),
}


def piecewise_server(answer: bytes, size: int) -> AsyncContextManager[str]:
    """A server that answers every request with ``answer`` in writes of ``size`` bytes,
    so that the client parses it across many reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for start in range(0, len(answer), size):
                writer.write(answer[start : start + size])
                await writer.drain()
                await asyncio.sleep(0)

    return tcp_server(handle)


@pytest.mark.parametrize(
    ("answer", "reason"), list(MALFORMED_ANSWERS.values()), ids=list(MALFORMED_ANSWERS)
)
@pytest.mark.parametrize("delivery", ["at-once", "in-pieces"])
async def test_a_malformed_answer_is_refused_on_its_bytes(
    answer: bytes, reason: str, delivery: str
) -> None:
    piece = 7 if len(answer) <= 1024 else 4096  # the big ones in pages, not in crumbs
    server = raw_server(answer) if delivery == "at-once" else piecewise_server(answer, piece)
    async with server as url, client_of(url) as client:
        with pytest.raises(HttpFailure, match=reason):
            await call(client, "/orders", within=5.0)  # a timeout here: not refused
        assert client._idle == []  # nothing broken is kept
        assert client._open == 0


def exchanges_by_method() -> tuple[AsyncContextManager[str], list[str]]:
    """A server answering HEAD with headers announcing a body it does not send (as HEAD
    answers do), anything else with ``ok``, framed by length or, for a path ending in
    /chunked, chunked; it records each request as "connection-number METHOD"."""
    seen: list[str] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        number, connections = connections, connections + 1
        while True:
            request_line = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
            method, path, _ = request_line.decode().split(" ")
            seen.append(f"{number} {method}")
            if path.endswith("/chunked"):
                head, body = b"Transfer-Encoding: chunked\r\n\r\n", b"2\r\nok\r\n0\r\n\r\n"
            else:
                head, body = b"Content-Length: 2\r\n\r\n", b"ok"
            writer.write(OK_HEAD + head + (b"" if method == "HEAD" else body))
            await writer.drain()

    return tcp_server(handle), seen


async def test_a_head_answer_ends_at_its_head_and_keeps_its_connection() -> None:
    server, seen = exchanges_by_method()
    async with server as url, client_of(url) as client:
        for path in ("/orders", "/chunked"):
            head = await call(client, path, method="HEAD", body=b"")
            assert (head.status, head.body) == (200, b"")
            got = await call(client, path, method="GET", body=b"")
            assert (got.status, got.body) == (200, b"ok")  # not read as the HEAD's body
    assert seen == ["0 HEAD", "0 GET", "0 HEAD", "0 GET"]  # one connection throughout


@pytest.mark.parametrize(
    "after",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno", b"garbage"],
    ids=["a-second-answer", "garbage"],
)
async def test_bytes_after_an_answer_leave_it_read_but_the_connection_unused(
    after: bytes,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + after
    async with raw_server(answer) as url, client_of(url) as client:
        for _ in range(2):
            assert (await call(client, "/orders")).body == b"ok"
            assert client._idle == []  # the next request goes on a new connection


async def test_header_values_are_latin_1_without_surrounding_whitespace() -> None:
    answer = OK_HEAD + b"X-A:  caf\xe9 \t\r\nX-B:\t\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(answer) as url, client_of(url) as client:
        got = await call(client, "/orders")
    assert got.headers == [("X-A", "caf\u00e9"), ("X-B", ""), ("Content-Length", "0")]


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
