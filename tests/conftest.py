"""Fixtures: a private, real redis-server; real aiohttp upstreams; gateways in-process."""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from tests.helpers import Gateway, OpenGateway, Shop, TlsFiles, open_gateway, settings_for
from tests.processes import GatewayProcess
from tests.scripts_rig import Rig, open_rig


def pytest_configure(config: pytest.Config) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    """A client of the private Redis, emptied before each test."""
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    """A real order backend on loopback that records what reached it."""
    backend = Shop()
    server = TestServer(backend.app(), host="127.0.0.1")
    await server.start_server()
    backend.url = str(server.make_url("")).rstrip("/")
    yield backend
    await server.close()


@pytest.fixture
def settings_data(shop: Shop) -> dict[str, Any]:
    """The issue's example config, pointed at the test shop; tests change it freely."""
    return {
        "gateway": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0, "token": "test-admin-token"},
        "identity": {"header": "X-User-Id"},
        "upstreams": {"shop": {"url": shop.url, "timeout": 2.0}},
        "campaigns": [
            {
                "id": "phone-1111",
                "route": "POST /seckill/phone-1111",
                "upstream": "shop",
                "stock": 10,
                "per_user_limit": 1,
                "max_quantity": 1,
            }
        ],
    }


@pytest.fixture
async def gateway(
    redis: Redis, redis_server: EmbeddedRedis, settings_data: dict[str, Any]
) -> AsyncIterator[Gateway]:
    """A gateway (edge and admin test clients) on the settings in ``settings_data``."""
    async with open_gateway(settings_for(settings_data), redis_server.url) as gw:
        yield gw


@pytest.fixture
def new_gateway(settings_data: dict[str, Any], redis_server: EmbeddedRedis) -> OpenGateway:
    """``async with new_gateway() as gw``: a gateway like the ``gateway`` fixture's, on
    ``settings_data`` as the test has changed it by then (or a second one beside it)."""

    def start() -> contextlib.AbstractAsyncContextManager[Gateway]:
        return open_gateway(settings_for(settings_data), redis_server.url)

    return start


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key = directory / "ca.key"
    request = directory / "server.csr"
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=flashgate-test-ca "
        f"-keyout {ca_key} -out {files.ca}",
        f"req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout {files.key} -out {request}",
        f"x509 -req -in {request} -CA {files.ca} -CAkey {ca_key} -CAcreateserial -days 2 "
        f"-extfile {extensions} -out {files.cert}",
    ):
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True)
    return files


@pytest.fixture
async def rig(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[Rig]:
    """The Lua script tests' rig (tests/scripts_rig.py). Depends on ``redis`` so that Redis
    is empty (and its script cache too)."""
    async with open_rig(redis_server.url) as built:
        yield built


@pytest.fixture
def process_config(settings_data: dict[str, Any], redis_server: EmbeddedRedis) -> dict[str, Any]:
    """The settings of a ``flashgate run`` child process: a copy of ``settings_data`` on the
    session's Redis; tests change it freely."""
    config: dict[str, Any] = json.loads(json.dumps(settings_data))
    config["redis"] = {"url": redis_server.url}
    return config


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``run_gateway(config, *args)``: ``flashgate run`` with ``args`` in a child process on a
    copy of ``config`` (free ports where it says 0), started and ready; stopped after the test
    if it still runs."""
    started: list[GatewayProcess] = []

    def run(config: dict[str, Any], *args: str) -> GatewayProcess:
        process = GatewayProcess(json.loads(json.dumps(config)), tmp_path, *args)
        started.append(process)
        return process.start()

    yield run
    for process in started:
        process.stop()


# --- Redis Sentinel and Cluster topologies (real servers, see gateway/embedded/topology.py) ---

from collections.abc import Callable  # noqa: E402

from gateway.embedded.topology import ClusterTopology, SentinelTopology  # noqa: E402


@pytest.fixture(scope="session")
def sentinel_topology() -> Iterator[SentinelTopology]:
    """One primary, two replicas, three Sentinels, shared: a test must leave it healthy, so a
    test that kills a node uses ``fresh_sentinel``."""
    with SentinelTopology() as topology:
        yield topology


@pytest.fixture(scope="session")
def cluster_topology() -> Iterator[ClusterTopology]:
    """Three primaries with two replicas each, shared: a test that moves a slot moves it back,
    and one that kills a node uses ``fresh_cluster``."""
    with ClusterTopology() as topology:
        yield topology


@pytest.fixture
def fresh_sentinel() -> Iterator[Callable[..., SentinelTopology]]:
    """``fresh_sentinel(**options)``: a started topology of this test's own, closed after it."""
    started: list[SentinelTopology] = []

    def start(**options: Any) -> SentinelTopology:
        topology = SentinelTopology(**options)
        started.append(topology)
        return topology.start()

    yield start
    for topology in started:
        topology.close()


@pytest.fixture
def fresh_cluster() -> Iterator[Callable[..., ClusterTopology]]:
    """``fresh_cluster(**options)``: a started cluster of this test's own, closed after it."""
    started: list[ClusterTopology] = []

    def start(**options: Any) -> ClusterTopology:
        topology = ClusterTopology(**options)
        started.append(topology)
        return topology.start()

    yield start
    for topology in started:
        topology.close()
