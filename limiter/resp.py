"""The auto-pipeline's own Redis connection: RESP2 on an asyncio protocol, parsed by
hiredis.

redis-py's asyncio connection reads each reply through several coroutines and
takes and returns pooled connections under a lock: at a flash sale's ordinary
rate (a round trip or two per winner) that was most of a round trip's cost in the
gateway. Here a round trip is one write of commands packed in C, and the replies
are matched to it as they arrive. The connection is opened as redis-py would open
it (host or unix socket, TLS, AUTH, SELECT), from the settings of the URL.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from limiter.topology import Address, NodeOptions


class Demoted(RedisConnectionError):
    """The node answered READONLY: it is a replica now, no longer the primary."""


class _Refusal(Exception):
    """An error reply, as hiredis builds it; turned into redis-py's exception."""


#: Error replies that say the connection, not the command, is unusable (redis-py raises
#: them as ConnectionError): the round trip fails as a whole, and the breaker counts it.
_CONNECTION_REFUSALS: dict[str, type[RedisConnectionError]] = {
    "LOADING": BusyLoadingError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "ERR max number of clients reached": RedisConnectionError,
    # a replica (the primary was demoted by a failover): writes go elsewhere now
    "READONLY": Demoted,
}


def _refusal(reply: _Refusal) -> RedisError:
    message = str(reply)
    for prefix, kind in _CONNECTION_REFUSALS.items():
        if message.startswith(prefix):
            return kind(message)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class RespConnection(asyncio.Protocol):
    """One connection; ``round_trip`` writes packed commands and gets their replies in
    order (an error reply comes back as its exception, in its place)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader(replyError=_Refusal)
        #: Round trips in flight: (replies expected, replies so far, future).
        self._waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def round_trip(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            future.set_exception(RedisConnectionError("the connection to redis is closed"))
            return future
        self._waiting.append((count, [], future))
        self.transport.write(packed)
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if not self._waiting:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                count, replies, future = self._waiting[0]
                if isinstance(reply, _Refusal):
                    reply = _refusal(reply)
                    if isinstance(reply, RedisConnectionError):
                        self._fail(reply)
                        self.close()
                        return
                replies.append(reply)
                if len(replies) == count:
                    self._waiting.popleft()
                    if not future.done():
                        future.set_result(replies)
        except hiredis.ProtocolError as exc:
            self._fail(RedisConnectionError(f"redis sent something unreadable: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f": {exc}" if exc else ""
        self._fail(RedisConnectionError(f"the connection to redis was lost{reason}"))

    def _fail(self, failure: Exception) -> None:
        while self._waiting:
            _, _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(failure)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def open_connection(options: NodeOptions, address: Address) -> RespConnection:
    """A connection to one data node, authenticated and on its database."""
    kwargs = options.client_options
    loop = asyncio.get_running_loop()
    try:
        if address.port == 0:
            _, connection = await loop.create_unix_connection(RespConnection, address.host)
        else:
            tls = _tls_context(kwargs) if options.location.tls else None
            _, connection = await loop.create_connection(
                RespConnection,
                address.host,
                address.port,
                ssl=tls,
                server_hostname=address.host if tls else None,
            )
    except OSError as exc:
        raise RedisConnectionError(f"cannot connect to redis at {address}: {exc}") from exc
    try:
        await _introduce(connection, kwargs)
    except BaseException:  # refused, or abandoned at the guard's deadline: never kept
        connection.close()
        raise
    return connection


async def _introduce(connection: RespConnection, kwargs: dict[str, Any]) -> None:
    commands: list[tuple[str | int, ...]] = []
    if kwargs.get("password"):
        user = kwargs.get("username")
        commands.append(
            ("AUTH", user, kwargs["password"]) if user else ("AUTH", kwargs["password"])
        )
    if kwargs.get("db"):
        commands.append(("SELECT", kwargs["db"]))
    if kwargs.get("client_name"):
        commands.append(("CLIENT", "SETNAME", kwargs["client_name"]))
    if not commands:
        return
    packed = b"".join(hiredis.pack_command(command) for command in commands)  # type: ignore[arg-type]
    for reply in await connection.round_trip(packed, len(commands)):
        if isinstance(reply, Exception):
            raise RedisConnectionError(f"redis refused the connection's setup: {reply}")


def _tls_context(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """TLS as redis-py's SSLConnection would set it up from the same settings."""
    context = ssl.create_default_context(
        cafile=kwargs.get("ssl_ca_certs"),
        capath=kwargs.get("ssl_ca_path"),
        cadata=kwargs.get("ssl_ca_data"),
    )
    if kwargs.get("ssl_certfile"):
        context.load_cert_chain(
            kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"), kwargs.get("ssl_password")
        )
    if kwargs.get("ssl_min_version") is not None:
        context.minimum_version = kwargs["ssl_min_version"]
    if kwargs.get("ssl_ciphers"):
        context.set_ciphers(kwargs["ssl_ciphers"])
    requirement = kwargs.get("ssl_cert_reqs", "required")
    if requirement in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = bool(kwargs.get("ssl_check_hostname", True))
        if requirement in ("optional", ssl.CERT_OPTIONAL):
            context.verify_mode = ssl.CERT_OPTIONAL
    return context
