"""A lean HTTP/1.1 client for the order backend: keep-alive connections on asyncio
protocols, one request at a time on each.

aiohttp's client spent about a fifth of a winner's CPU in the gateway (its request
and response objects, timers, traces, its writer); a forward needs one write of
pre-encoded bytes and a parser for one answer. The pool never refuses: past
``max_connections`` a request waits for a connection, within its own deadline.

The answer's syntax and framing are llhttp's (through httptools, in its strict
default: no lenient flag is set): status line, header fields, Content-Length,
chunked, 1xx, 204/304, keep-alive. A malformed answer is the backend failing, an
HttpFailure, before anything of it is relayed or kept. Ours are what llhttp leaves
to its caller: the size limits (head, trailers, body), the end of a HEAD answer at
its head and of an unframed one at the connection's end, and the refusals of what
llhttp accepts but a forward must not (a version other than 1.0 and 1.1, a status
outside 100-599, a transfer coding other than chunked, 101, endless 1xx).

A request is sent again only when the backend closed a reused keep-alive connection
as the request went out, without a byte in reply (it closed an idle connection and
never read the request); X-Reservation-Id is the backend's idempotency key should it
have run it after all. A request that timed out keeps its connection's slot while
the backend may still be running it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, NoReturn
from urllib.parse import quote, urlsplit

import httptools

#: A pooled connection idle for longer than this is closed rather than reused: many
#: servers close idle keep-alive connections after a few seconds, and a request
#: written just as the server closes fails.
IDLE_SECONDS = 2.0
#: A status line and headers longer than this are refused (trailers too).
MAX_HEAD_BYTES = 64 * 1024
#: Informational answers (1xx) allowed before the answer.
MAX_INFORMATIONAL = 8
#: What a chunk's size line may take, extensions included, beyond its data.
MAX_CHUNK_LINE = 1024
#: The bytes of a status line around its reason phrase ("HTTP/1.1 200 " and CRLF),
#: and of a header field around its name and value (": " and CRLF).
_STATUS_LINE_BYTES = 15
_FIELD_BYTES = 4
_VERSIONS = ("1.0", "1.1")
_BODILESS = (204, 304)


class HttpFailure(Exception):
    """The exchange failed: no connection, a broken one, or an answer that is not HTTP."""


class TooLarge(HttpFailure):
    """The answer's body is longer than allowed."""


class NotSent(TimeoutError):
    """No connection came free in time: the request was not sent."""


class RawReply(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _encoded(text: str) -> bytes:
    # aiohttp decodes request headers as UTF-8 with surrogateescape: this gives the bytes back.
    return text.encode("utf-8", "surrogateescape")


class _Stop(Exception):
    """Raised in a callback to stop llhttp at bytes past the answer (never escapes)."""


class _Reader:
    """Reads one answer, after any 1xx, from the bytes of one exchange.

    llhttp parses; these callbacks keep the limits and the refusals of our own. A
    reader serves one exchange only: a HEAD answer ends at its head while llhttp would
    wait for the body its headers announce, so the next exchange gets a fresh parser.
    """

    def __init__(self, max_body: int, head_request: bool) -> None:
        self.max_body = max_body
        self.head_request = head_request
        self.reply: RawReply | None = None
        #: Whether the connection may carry another exchange (llhttp's should_keep_alive).
        self.keep_alive = False
        #: Bytes came after the answer: the connection cannot be trusted with another.
        self.stray = False
        self._parser = httptools.HttpResponseParser(self)
        self._failure: HttpFailure | None = None
        self._informational = 0
        self._in_body = False  # the final answer's head is complete
        self._until_close = False  # and its body runs until the connection closes
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._trailer_bytes = 0
        self._chunks = 0
        self._fed = 0
        self._body = bytearray()

    # --- fed by the connection

    def feed(self, data: bytes) -> RawReply | None:
        """Parse ``data``; the answer once it is complete; raises HttpFailure."""
        self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._failure is not None:
                raise self._failure from None
            if self.reply is None:
                raise HttpFailure(f"the backend's answer is not valid HTTP/1.1: {exc}") from None
            self.stray = True  # bytes after the answer that do not even parse
        if self.reply is None:
            self._check_unfinished()
        return self.reply

    def at_eof(self) -> RawReply | None:
        """The answer, if the connection's end is what completes it (no framing)."""
        if self.reply is None and self._in_body and self._until_close:
            self.reply = RawReply(self._status, self._headers, bytes(self._body))
        return self.reply

    # --- httptools callbacks

    def on_message_begin(self) -> None:
        self._past_the_answer()
        self._head_bytes = _STATUS_LINE_BYTES
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._count_head(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _FIELD_BYTES
        if self._in_body:  # a trailer: counted, then dropped
            self._trailer_bytes += size
            if self._trailer_bytes > MAX_HEAD_BYTES:
                self._refuse(HttpFailure("the backend sent oversized trailers"))
            return
        self._count_head(size)
        # llhttp drops the leading whitespace of a value but keeps the trailing
        self._headers.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))

    def on_headers_complete(self) -> None:
        self._past_the_answer()
        version = self._parser.get_http_version()
        status = self._parser.get_status_code()
        if version not in _VERSIONS:
            self._refuse(HttpFailure(f"the backend's answer is not HTTP/1.x: HTTP/{version}"))
        if not 100 <= status <= 599:
            self._refuse(HttpFailure(f"the backend answered status {status}, not 1xx-5xx"))
        if status < 200:
            self._informational_done(status)
        else:
            self._head_done(status)

    def on_body(self, body: bytes) -> None:
        self._past_the_answer()
        if len(self._body) + len(body) > self.max_body:
            self._refuse(TooLarge(f"the backend answered more than {self.max_body} bytes"))
        self._body += body

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        if not self._in_body or self.reply is not None:
            return  # a 1xx ends here, and a HEAD answer ended at its head
        self.keep_alive = self._parser.should_keep_alive()
        self.reply = RawReply(self._status, self._headers, bytes(self._body))

    # --- ours

    def _informational_done(self, status: int) -> None:
        """A 100 Continue or 103 Early Hints: llhttp reads the answer that follows."""
        self._informational += 1
        if status == 101 or self._informational > MAX_INFORMATIONAL:
            self._refuse(HttpFailure(f"the backend answered {status} where an answer was due"))

    def _head_done(self, status: int) -> None:
        """The final answer's head: its transfer coding and declared size checked, a HEAD
        answer complete (httptools cannot tell llhttp that its body is absent; one whose
        headers frame no body does not keep its connection, as llhttp would wait for the
        connection's end)."""
        self._status = status
        self._in_body = True
        if self.head_request:
            self.keep_alive = self._parser.should_keep_alive()
            self.reply = RawReply(status, self._headers, b"")
            return
        if status in _BODILESS:
            return  # llhttp reads no body, whatever the headers say
        codings = self._values("transfer-encoding")
        if codings and codings != ["chunked"]:
            self._refuse(HttpFailure(f"the backend's answer has transfer coding {codings!r}"))
        lengths = self._values("content-length")  # llhttp allows one, of digits only
        if lengths and int(lengths[0]) > self.max_body:
            self._refuse(TooLarge(f"the backend answered more than {self.max_body} bytes"))
        self._until_close = not codings and not lengths

    def _values(self, name: str) -> list[str]:
        """The comma-separated tokens of every ``name`` header, lower-cased."""
        return [
            token.strip().lower()
            for key, value in self._headers
            if key.lower() == name
            for token in value.split(",")
        ]

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(HttpFailure("the backend's answer has an oversized head"))

    def _check_unfinished(self) -> None:
        """httptools holds a header field until the next one starts: the bytes not yet
        parsed as body bound what a head or trailers that never end can take."""
        unparsed = self._fed - len(self._body)
        allowed = MAX_HEAD_BYTES * (1 + self._informational)
        if not self._in_body and unparsed > allowed:
            raise HttpFailure("the backend's answer has an oversized head")
        if unparsed > allowed + MAX_HEAD_BYTES + MAX_CHUNK_LINE * self._chunks:
            raise HttpFailure("the backend sent oversized trailers or chunk lines")

    def _past_the_answer(self) -> None:
        """Bytes after the answer (another answer, a HEAD answer's body) stop llhttp."""
        if self.reply is not None:
            self.stray = True
            raise _Stop

    def _refuse(self, failure: HttpFailure) -> NoReturn:
        """Stop llhttp, and have ``feed`` raise ``failure`` (not the callback error)."""
        self._failure = failure
        raise failure


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends a request and reads its answer."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        #: Requests sent on it, and whether any byte came back for the last one.
        self.exchanges = 0
        self.heard = False
        #: Called once when the connection is lost (see Http1Client._abandon).
        self.on_gone: Callable[[], None] | None = None
        self._answer: asyncio.Future[RawReply] | None = None
        self._reader: _Reader | None = None
        self._keep_alive = False

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive

    @property
    def stale(self) -> bool:
        """Closed while its latest request, not its first, waited with nothing heard."""
        return self.closed and self.exchanges > 1 and not self.heard

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP or TLS: a Transport

    def data_received(self, data: bytes) -> None:
        self.heard = True
        reader = self._reader
        if reader is None or self._answer is None or self._answer.done():
            self.close()  # an answer nobody asked for: the connection cannot be trusted
            return
        try:
            reply = reader.feed(data)
        except HttpFailure as exc:
            self._fail(exc)
            return
        if reply is not None:
            self._finish(reply, reader.keep_alive and not reader.stray)

    def eof_received(self) -> bool:
        reply = self._reader.at_eof() if self._reader is not None else None
        if reply is not None:
            self._finish(reply, keep_alive=False)  # the body ran until the server closed
        else:
            self._fail(HttpFailure("the backend closed the connection before answering"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f": {exc}" if exc else ""
        self._fail(HttpFailure(f"the connection to the backend was lost{reason}"))
        gone, self.on_gone = self.on_gone, None
        if gone is not None:
            gone()

    # --- one exchange

    def exchange(self, request: bytes, head_request: bool) -> asyncio.Future[RawReply]:
        assert self.transport is not None
        answer: asyncio.Future[RawReply] = asyncio.get_running_loop().create_future()
        self._answer = answer
        self._reader = _Reader(self.max_body, head_request)
        self.exchanges += 1
        self.heard = False
        self._keep_alive = False
        self.transport.write(request)
        return answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, failure: HttpFailure) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(failure)
        self.close()

    def _finish(self, reply: RawReply, keep_alive: bool) -> None:
        self._reader = None  # whatever comes next on it is nobody's answer
        self._keep_alive = keep_alive
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(reply)
        if not keep_alive:
            self.close()


class Http1Client:
    """Requests to one origin (``http[s]://host[:port][/base]``) over pooled connections."""

    def __init__(self, url: str, *, max_connections: int, max_body: int) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None  # the config checked the URL
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = parts.port is None or parts.port == (443 if self.tls else 80)
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if default_port else f"{name}:{self.port}"
        self.base_path = quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
        self.max_connections = max_connections
        self.max_body = max_body
        self._ssl = ssl.create_default_context() if self.tls else None
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or opening
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closing = False

    def encode(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        """The request's bytes; ``target`` is a path with its query, below the base path."""
        lines = [f"{method} {self.base_path}{target} HTTP/1.1\r\n"]
        has_host = False
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise HttpFailure(f"header {name!r} holds a line break")
            has_host = has_host or name.lower() == "host"
            lines.append(f"{name}: {value}\r\n")
        if not has_host:
            lines.append(f"Host: {self.host_header}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        return _encoded("".join(lines)) + body

    async def send(self, method: str, request: bytes, within: float) -> RawReply:
        """Send encoded ``request``; raises HttpFailure, NotSent, or TimeoutError when no
        answer came within ``within`` seconds.

        A request is sent only with at least half of ``within`` left: one that waited
        for a connection longer than that fails unsent, rather than go out with no
        time to be answered (and be run by the backend for a buyer told it failed).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        send_by = deadline - within / 2
        connection = await self._connection(send_by)
        try:
            return await self._exchange(connection, method, request, deadline, within)
        except HttpFailure:
            if not connection.stale or loop.time() >= send_by:
                raise
        # The backend closed a reused connection just as the request went out, and sent
        # nothing back: it almost surely never read it. Once more, on a new connection
        # (should it have run it after all, X-Reservation-Id tells the backend it is the
        # same order).
        connection = await self._connection(send_by, fresh=True)
        return await self._exchange(connection, method, request, deadline, within)

    async def _connection(self, send_by: float, *, fresh: bool = False) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = None if fresh else self._idle_connection(loop.time())
        if connection is not None:
            return connection
        waited = loop.time()
        try:
            async with asyncio.timeout_at(send_by):
                return await self._new_or_freed()
        except TimeoutError:
            raise NotSent(
                f"no connection to {self.host_header} within {loop.time() - waited:.3g}s "
                f"({self.max_connections} in use or opening)"
            ) from None

    async def _exchange(
        self, connection: _Connection, method: str, request: bytes, deadline: float, grace: float
    ) -> RawReply:
        loop = asyncio.get_running_loop()
        answer = connection.exchange(request, method == "HEAD")
        timer = loop.call_at(deadline, _time_out, answer)
        try:
            result = await answer
        except TimeoutError:
            self._abandon(connection, grace)
            raise
        except BaseException:
            connection.close()  # a late answer must never be read as the next one's
            self._release(connection)
            raise
        finally:
            timer.cancel()
        self._release(connection)
        return result

    def _abandon(self, connection: _Connection, grace: float) -> None:
        """A request that timed out may still be running at the backend: its connection
        keeps its slot, so that ``max_connections`` bounds the backend's load, until the
        backend answers (the late answer is dropped) or closes it, or ``grace`` seconds
        pass; then it is closed and the slot freed."""
        if connection.closed:
            self._hand_back(None)
            return
        connection.on_gone = lambda: self._hand_back(None)
        asyncio.get_running_loop().call_later(grace, connection.close)

    def _idle_connection(self, now: float) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
            self._open -= 1
        return None

    async def _new_or_freed(self) -> _Connection:
        if self._open >= self.max_connections:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                freed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over as we timed out
                    self._hand_back(waiter.result())
                raise
            if freed is not None and not freed.closed:
                return freed
            # else a slot: that of a closed connection, or one the backend closed since
            # it was handed over (nothing was sent on it for this request)
        else:
            self._open += 1  # a free slot is taken; a waiter woken with None inherits one
        try:
            return await self._connect()
        except BaseException:
            self._hand_back(None)
            raise

    async def _connect(self) -> _Connection:
        if self._closing:
            raise HttpFailure("the client is closed")
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self.max_body),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self.tls else None,
            )
        except OSError as exc:
            raise HttpFailure(f"cannot connect to {self.host_header}: {exc}") from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not self._closing:
            connection.idle_since = asyncio.get_running_loop().time()
            self._hand_back(connection)
        else:
            connection.close()
            self._hand_back(None)

    def _hand_back(self, connection: _Connection | None) -> None:
        """A connection (or, with None, the slot of a closed one) goes to the first
        waiter, else to the idle stack (or the slot is freed)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if connection is None:
            self._open -= 1
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        self._closing = True
        for connection in self._idle:
            connection.close()
        self._open -= len(self._idle)
        self._idle.clear()


def _time_out(answer: asyncio.Future[RawReply]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())
