"""The auto-pipeline's own Redis connection (limiter/resp.py): opened as redis-py
would open it from the same URL, against real private redis-servers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis, free_port
from limiter.errors import StorageError
from limiter.pipeline import AutoPipeline
from tests.helpers import TlsFiles, auto_pipeline, wait_for

pytestmark = pytest.mark.integration


def pipeline_of(url: str) -> contextlib.AbstractAsyncContextManager[AutoPipeline]:
    return auto_pipeline(url, 2.0)


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[EmbeddedRedis]:
    """A private Redis with a password and an ACL user."""
    with EmbeddedRedis() as server:
        with SyncRedis.from_url(server.url) as admin:
            admin.execute_command("ACL", "SETUSER", "shop", "on", ">secret", "~*", "+@all")
            admin.config_set("requirepass", "topsecret")
        yield server


@pytest.mark.parametrize(
    ("credentials", "database"),
    [("shop:secret@", 3), (":topsecret@", 0), ("default:topsecret@", 5)],
    ids=["acl-user", "password-only", "default-user"],
)
async def test_it_authenticates_and_selects_the_database_of_the_url(
    guarded_server: EmbeddedRedis, credentials: str, database: int
) -> None:
    url = f"redis://{credentials}127.0.0.1:{guarded_server.port}/{database}"
    async with pipeline_of(url) as pipe:
        await pipe.call("SET", "where", "here", what="write")
        assert await pipe.call("HSET", "h", "a", 1, "b", 2, what="write") == 2
        assert await pipe.call("HGETALL", "h", what="read") == {b"a": b"1", b"b": b"2"}
    checker = Redis.from_url(url)
    try:
        assert await checker.get("where") == b"here"
        await checker.flushdb()
    finally:
        await checker.aclose()


@pytest.mark.parametrize(
    "credentials", ["shop:wrong@", ":wrong@", ""], ids=["bad-acl", "bad-password", "none"]
)
async def test_refused_credentials_are_a_storage_error_and_nothing_is_written(
    guarded_server: EmbeddedRedis, credentials: str
) -> None:
    url = f"redis://{credentials}127.0.0.1:{guarded_server.port}/0"
    async with pipeline_of(url) as pipe:
        with pytest.raises(StorageError):
            await pipe.call("SET", "intruder", "1", what="write")
    checker = Redis.from_url(f"redis://:topsecret@127.0.0.1:{guarded_server.port}/0")
    try:
        assert await checker.exists("intruder") == 0
    finally:
        await checker.aclose()


async def test_it_connects_over_a_unix_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="flashgate-sock-") as directory:
        path = Path(directory) / "redis.sock"
        with EmbeddedRedis(extra_args=("--unixsocket", str(path), "--unixsocketperm", "700")):
            async with pipeline_of(f"unix://{path}?db=2") as pipe:
                assert await pipe.call("PING", what="ping") is True
                await pipe.call("SET", "k", "v", what="write")
                assert await pipe.call("GET", "k", what="read") == b"v"
            checker = Redis.from_url(f"unix://{path}?db=2")
            try:
                assert await checker.get("k") == b"v"
            finally:
                await checker.aclose()


async def test_a_killed_connection_fails_its_round_trip_and_the_next_one_reconnects(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with pipeline_of(redis_server.url) as pipe:
        await pipe.call("SET", "before", "1", what="write")
        await pipe.call("CLIENT", "SETNAME", "doomed", what="name")
        blocked = asyncio.ensure_future(pipe.call("BLPOP", "nothing", 5, what="block"))

        async def blocking() -> bool:  # Redis holds the BLPOP: the round trip is out
            return any(client["cmd"] == "blpop" for client in await redis.client_list())

        await wait_for(blocking)
        # the pipeline's connections are killed, the blocked one among them
        killed = 0
        for client in await redis.client_list():
            if client["cmd"] in ("blpop", "client|setname", "set"):
                killed += await redis.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "KILL", "ID", client["id"]
                )
        assert killed >= 1
        with pytest.raises(StorageError):
            await blocked
        assert await pipe.call("GET", "before", what="read") == b"1"  # a new connection


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[tuple[EmbeddedRedis, int]]:
    """A private Redis that also listens with TLS (clients need no certificate)."""
    tls_port = free_port()
    extra = (
        *("--tls-port", str(tls_port), "--tls-auth-clients", "no"),
        *("--tls-cert-file", str(tls_files.cert), "--tls-key-file", str(tls_files.key)),
        *("--tls-ca-cert-file", str(tls_files.ca)),
    )
    with EmbeddedRedis(extra_args=extra) as server:
        yield server, tls_port


@pytest.mark.parametrize(
    "query", ["ssl_ca_certs={ca}", "ssl_cert_reqs=none"], ids=["verified", "unverified"]
)
async def test_it_speaks_tls_as_the_url_asks(
    tls_server: tuple[EmbeddedRedis, int], tls_files: TlsFiles, query: str
) -> None:
    _, tls_port = tls_server
    url = f"rediss://127.0.0.1:{tls_port}/0?" + query.format(ca=tls_files.ca)
    async with pipeline_of(url) as pipe:
        assert await pipe.call("PING", what="ping") is True


async def test_a_certificate_it_cannot_verify_is_refused(
    tls_server: tuple[EmbeddedRedis, int],
) -> None:
    _, tls_port = tls_server
    async with pipeline_of(f"rediss://127.0.0.1:{tls_port}/0") as pipe:
        with pytest.raises(StorageError, match="certificate verify failed"):
            await pipe.call("PING", what="ping")


async def test_a_connection_redis_closed_while_idle_is_not_used_again(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    async with pipeline_of(redis_server.url) as pipe:
        await pipe.call("CLIENT", "SETNAME", "idle-one", what="name")
        for client in await redis.client_list():
            if client["name"] == "idle-one":
                await redis.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "KILL", "ID", client["id"]
                )
        node = pipe.node(pipe.topology.primaries()[0])
        await wait_for(lambda: all(c.closed for c in node._free))
        assert await pipe.call("PING", what="ping") is True  # on a new connection, no failure


async def test_missing_credentials_are_a_connection_failure_the_breaker_counts(
    guarded_server: EmbeddedRedis,
) -> None:
    # NOAUTH says the connection, not the command, is refused (redis-py raises it as a
    # ConnectionError): the round trip fails and the breaker opens after its threshold.
    async with pipeline_of(f"redis://127.0.0.1:{guarded_server.port}/0") as pipe:
        breaker = pipe.guard.breaker
        for _ in range(breaker.threshold):
            with pytest.raises(StorageError, match="Authentication required"):
                await pipe.call("GET", "k", what="read")
        assert breaker.is_open
        with pytest.raises(StorageError, match="circuit open"):
            await pipe.call("GET", "k", what="read")


async def test_a_connection_abandoned_while_authenticating_is_closed(
    guarded_server: EmbeddedRedis,
) -> None:
    url = f"redis://shop:secret@127.0.0.1:{guarded_server.port}/4"
    checker = Redis.from_url(f"redis://:topsecret@127.0.0.1:{guarded_server.port}/0")
    assert guarded_server.process is not None
    try:
        async with auto_pipeline(url, 0.2) as pipe:
            guarded_server.process.send_signal(signal.SIGSTOP)  # AUTH is sent, never answered
            try:
                for _ in range(3):
                    with pytest.raises(StorageError, match="did not answer"):
                        await pipe.call("PING", what="ping")
            finally:
                guarded_server.process.send_signal(signal.SIGCONT)

            async def only_the_checker_is_left() -> bool:
                return len(await checker.client_list()) == 1

            await wait_for(only_the_checker_is_left)
            assert await pipe.call("PING", what="ping") is True
    finally:
        await checker.aclose()
