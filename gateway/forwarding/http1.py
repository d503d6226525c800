"""A lean HTTP/1.1 client for the order backend: keep-alive connections on asyncio
protocols, one request at a time on each.

aiohttp's client spent about a fifth of a winner's CPU in the gateway (its request
and response objects, timers, traces, its writer); a forward needs one write of
pre-encoded bytes and a parser for one answer. The pool never refuses: past
``max_connections`` a request waits for a connection, within its own deadline.

A request is sent again only when the backend closed a reused keep-alive connection
as the request went out, without a byte in reply (it closed an idle connection and
never read the request); X-Reservation-Id is the backend's idempotency key should it
have run it after all. A request that timed out keeps its connection's slot while
the backend may still be running it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import quote, urlsplit

#: A pooled connection idle for longer than this is closed rather than reused: many
#: servers close idle keep-alive connections after a few seconds, and a request
#: written just as the server closes fails.
IDLE_SECONDS = 2.0
#: A status line and headers longer than this are refused (trailers too).
MAX_HEAD_BYTES = 64 * 1024
#: Informational answers (1xx) allowed before the answer.
MAX_INFORMATIONAL = 8
_DIGITS3 = re.compile(r"[0-9]{3}")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


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


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends a request and parses its answer."""

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
        self._buffer = bytearray()
        self._answer: asyncio.Future[RawReply] | None = None
        self._head_request = False
        # Of the answer being read:
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._keep_alive = False
        self._length: int | None = None  # None: chunked or until the connection closes
        self._chunked = False
        self._chunk_left = -1
        self._trailers = 0
        self._informational = 0
        self._body = bytearray()
        self._reading_body = False

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive and not self._buffer

    @property
    def stale(self) -> bool:
        """Closed while its latest request, not its first, waited with nothing heard."""
        return self.closed and self.exchanges > 1 and not self.heard

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP or TLS: a Transport

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self._answer is None or self._answer.done():
            self.close()  # an answer nobody asked for: the connection cannot be trusted
            return
        self._buffer += data
        try:
            self._parse()
        except HttpFailure as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        if self._reading_body and self._length is None and not self._chunked:
            self._keep_alive = False
            self._finish()  # the body ran until the server closed
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
        self.exchanges += 1
        self.heard = False
        self._head_request = head_request
        self._status = 0
        self._informational = 0
        self._keep_alive = False
        self._reading_body = False
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

    def _finish(self) -> None:
        answer = RawReply(self._status, self._headers, bytes(self._body))
        self._body.clear()
        self._reading_body = False
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)
        if not self._keep_alive:
            self.close()

    def _parse(self) -> None:
        while not self._reading_body:
            end = self._buffer.find(b"\r\n\r\n")
            if end > MAX_HEAD_BYTES or (end < 0 and len(self._buffer) > MAX_HEAD_BYTES):
                raise HttpFailure("the backend's answer has an oversized head")
            if end < 0:
                return
            head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            self._read_head(head)
        if self._chunked:
            self._read_chunks()
        elif self._length is not None and len(self._buffer) >= self._length:
            self._body += self._buffer[: self._length]
            del self._buffer[: self._length]
            self._finish()
        elif self._length is None:
            self._take(len(self._buffer))

    def _take(self, size: int) -> None:
        if len(self._body) + size > self.max_body:
            raise TooLarge(f"the backend answered more than {self.max_body} bytes")
        self._body += self._buffer[:size]
        del self._buffer[:size]

    def _read_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, _ = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or not _DIGITS3.fullmatch(code):
            raise HttpFailure(f"the backend's answer is not HTTP/1.x: {lines[0][:80]!r}")
        status = int(code)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise HttpFailure(f"the backend sent a malformed header line: {line[:80]!r}")
            headers.append((name, value.strip()))
        if 100 <= status < 200:
            self._informational += 1
            if status == 101 or self._informational > MAX_INFORMATIONAL:
                raise HttpFailure(f"the backend answered {status} where an answer was due")
            return  # informational (100 Continue, 103 Early Hints): the answer follows
        self._status = status
        self._headers = headers
        self._frame(version, headers)

    def _frame(self, version: str, headers: list[tuple[str, str]]) -> None:
        """How the body is delimited (RFC 9112 6.3), and whether the connection stays."""
        connection = {
            token.strip().lower()
            for name, value in headers
            if name.lower() == "connection"
            for token in value.split(",")
        }
        self._keep_alive = (
            "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        )
        codings = [
            token.strip().lower()
            for name, value in headers
            if name.lower() == "transfer-encoding"
            for token in value.split(",")
        ]
        lengths = {v for n, v in headers if n.lower() == "content-length"}
        self._chunked = False
        self._length = None
        self._reading_body = True
        if self._head_request or self._status in (204, 304):
            self._length = 0
        elif codings:
            if codings != ["chunked"]:
                raise HttpFailure(f"the backend's answer has transfer coding {codings!r}")
            self._chunked = True
            self._chunk_left = -1
            self._trailers = 0
            if lengths:  # framed twice: read as chunked, but do not trust the connection
                self._keep_alive = False
        elif lengths:
            if len(lengths) != 1 or not _DIGITS.fullmatch(value := lengths.pop()):
                raise HttpFailure("the backend's answer has an invalid Content-Length")
            self._length = int(value)
            if self._length > self.max_body:
                raise TooLarge(f"the backend answered more than {self.max_body} bytes")
        else:
            self._keep_alive = False  # the body runs until the server closes

    def _read_chunks(self) -> None:
        """Chunks (RFC 9112 7.1): ``_chunk_left`` is -1 before a size line, -2 in the
        trailers, else the bytes of the chunk still to come (then its CRLF)."""
        while self._reading_body:
            if self._chunk_left == -2:
                progressed = self._read_trailer()
            elif self._chunk_left == -1:
                progressed = self._read_chunk_size()
            else:
                progressed = self._read_chunk_data()
            if not progressed:
                return  # more bytes are needed

    def _read_trailer(self) -> bool:
        """One trailer line (dropped); the empty line ends the answer."""
        end = self._buffer.find(b"\r\n")
        if self._trailers + (end if end >= 0 else len(self._buffer)) > MAX_HEAD_BYTES:
            raise HttpFailure("the backend sent oversized trailers")
        if end < 0:
            return False
        self._trailers += end + 2
        del self._buffer[: end + 2]
        if end == 0:
            self._finish()
        return True

    def _read_chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end > 1024 or (end < 0 and len(self._buffer) > 1024):
            raise HttpFailure("the backend sent an oversized chunk size line")
        if end < 0:
            return False
        size = bytes(self._buffer[:end]).split(b";", 1)[0].strip()  # extensions dropped
        if not _HEX.fullmatch(size):
            raise HttpFailure(f"the backend sent a bad chunk size: {size[:20]!r}")
        del self._buffer[: end + 2]
        self._chunk_left = int(size, 16) or -2
        if len(self._body) + max(self._chunk_left, 0) > self.max_body:
            raise TooLarge(f"the backend answered more than {self.max_body} bytes")
        return True

    def _read_chunk_data(self) -> bool:
        if len(self._buffer) < self._chunk_left + 2:
            return False
        if self._buffer[self._chunk_left : self._chunk_left + 2] != b"\r\n":
            raise HttpFailure("the backend sent a chunk longer than announced")
        self._take(self._chunk_left)
        del self._buffer[:2]
        self._chunk_left = -1
        return True


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
