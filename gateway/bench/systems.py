"""The systems a bench measures, each in a process of its own: flashgate (``flashgate
run`` on a generated config), the reference servers of ``servers.py``, and the stub
order backend.

A ``System`` is how to start one (a context manager yielding where it serves) and,
when it sells, how its books are checked after a run (``measure.py``'s verdicts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from redis import Redis as SyncRedis

from gateway.bench.crowd import Tally
from gateway.bench.servers import stock_key
from gateway.embedded.server import free_port
from limiter.keys import CampaignKeys
from limiter.scripts import script

CAMPAIGN = "bench"
PATH = "/seckill/bench"
TOKEN = "bench-admin-token-not-secret"
#: Metric: the auto-pipeline's round trips to Redis (one per flush).
ROUND_TRIPS = "flashgate_redis_seconds_count"


@dataclass(frozen=True)
class Served:
    """A started system: its port, its process, and (flashgate) its admin API."""

    port: int
    pid: int | None = None
    admin: str | None = None


#: After a run: the verdict on the books, given what the crowd saw and whether the
#: sale was meant to sell out.
Check = Callable[[Tally, bool], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class System:
    start: Callable[[], contextlib.AbstractContextManager[Served]]
    check: Check | None = None


@contextlib.contextmanager
def process(command: list[str], ready: Callable[[], bool], name: str) -> Iterator[int]:
    """Run ``command`` until the block ends; ``ready`` says when it serves. Yields its pid."""
    with tempfile.TemporaryFile(prefix=f"flashgate-bench-{name}-") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not ready():
                if child.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    said = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} did not start: {said}")
                time.sleep(0.05)
            yield child.pid
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:  # loopback only
                return bool(response.status == 200)
        except OSError:
            return False

    return check


def answers_tcp(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    return check


@contextlib.contextmanager
def reference(kind: str, *extra: str) -> Iterator[Served]:
    """One of servers.py's servers on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "gateway.bench.servers", kind, "--port", str(port), *extra]
    ready = answers(f"http://127.0.0.1:{port}/_orders") if kind == "backend" else answers_tcp(port)
    with process(command, ready, kind) as pid:
        yield Served(port, pid)


# ------------------------------------------------------------------ flashgate


def campaign_ids(count: int) -> list[str]:
    """The bench campaign, and ``count - 1`` more beside it (the idle catalogue)."""
    return [CAMPAIGN, *(f"{CAMPAIGN}-{i}" for i in range(1, count))]


def flashgate_config(
    redis_url: str,
    backend: str,
    ports: tuple[int, int],
    stock: int,
    *,
    campaigns: int = 1,
    local_refusals: bool = False,
    per_user_limit: int = 1,
    wait_for_replicas: int = 0,
    shards: int = 1,
) -> dict[str, Any]:
    sharded = {"shards": shards} if shards > 1 else {}
    return {
        "redis": {"url": redis_url, "wait_for_replicas": wait_for_replicas},
        "gateway": {"port": ports[0]},
        "admin": {"port": ports[1], "token": TOKEN},
        "access_log": {
            "enabled": local_refusals,
            "path": os.devnull,
            "local_refusals": local_refusals,
        },
        "upstreams": {"shop": {"url": backend, "timeout": 5.0}},
        "campaigns": [
            {
                "id": campaign,
                "route": f"POST /seckill/{campaign}",
                "upstream": "shop",
                "stock": stock,
                "per_user_limit": per_user_limit,
                **sharded,
            }
            for campaign in campaign_ids(campaigns)
        ],
    }


@contextlib.contextmanager
def flashgate(
    redis_url: str, backend: str, stock: int, *, workers: int = 1, **config: Any
) -> Iterator[Served]:
    """``flashgate run --workers N`` until the block ends; ``config``: see
    ``flashgate_config``."""
    port, admin_port = free_port(), free_port()
    data = flashgate_config(redis_url, backend, (port, admin_port), stock, **config)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(data, file)
    command = [sys.executable, "-m", "gateway", "--log-level", "warning", "run"]
    command += ["-c", file.name, "--workers", str(workers)]
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        with process(command, answers(f"http://127.0.0.1:{port}/readyz"), "flashgate") as pid:
            _wait_for_workers(admin, workers)
            yield Served(port, pid, admin)
    finally:
        os.unlink(file.name)


def _wait_for_workers(admin: str, workers: int) -> None:
    """With --workers N, wait until N processes have said they are alive (the admin
    port may open a moment after the first worker answers on the buyers' port)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if gauge(scrape(admin), "flashgate_gateway_processes") >= workers:
                return
        time.sleep(0.1)


def scrape(admin: str) -> str:
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as response:  # loopback only
        return str(response.read().decode())


def gauge(text: str, name: str) -> float:
    """A metric's value, summed over its labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------ the baselines' data


def seed_campaign(node_url: str, stock: int) -> None:
    """The naive server creates nothing: create the campaign as flashgate does (its
    init_campaign.lua), on the node the baseline talks to."""
    keys = CampaignKeys(CAMPAIGN)
    client = SyncRedis.from_url(node_url)
    try:
        init = client.register_script(script("init_campaign").text)
        init(keys=[keys.state, keys.ledger], args=[stock, "bench", 100_000])
    finally:
        client.close()


def seed_counter(node_url: str, stock: int) -> None:
    """The deduct-only server's one counter."""
    client = SyncRedis.from_url(node_url)
    try:
        client.set(stock_key(CAMPAIGN), stock)
    finally:
        client.close()
