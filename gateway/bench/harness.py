"""``flashgate bench``: flash sales on this machine, flashgate against the naive
designs and bare aiohttp servers, every figure a ratio measured in the same run.

Each system under test runs in its own process (so does Redis, and the stub order
backend); the load generator runs here. Between runs Redis is flushed and the
backend forgets its orders. The parts, by job:

* ``scenarios.py``: what each scenario compares, under what load;
* ``systems.py``: starting flashgate and the reference servers (``servers.py``);
* ``datastore.py``: the Redis it runs on (embedded, or ``--redis URL``: one
  server, Sentinel or Cluster), flushing and counting on every primary;
* ``measure.py``: a run's figures and the verdicts on the books; ``idle.py``: the
  idle scenario; ``shards.py``: the shards scenario (``script_driver.py``: its
  processes calling reserve.lua on each Redis node); ``targets.py``: the goals;
  ``report.py``: the printed report;
* ``crowd.py`` and ``wrk.py``: the load generators.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.bench.datastore import Datastore, embedded, opened, require_empty, require_replicas
from gateway.bench.measure import Run
from gateway.bench.options import Options
from gateway.bench.scenarios import Bench, crowd_run
from gateway.bench.systems import CAMPAIGN, reference
from gateway.bench.targets import targets

__all__ = ["Options", "bench", "bench_url"]


async def bench(options: Options) -> dict[str, Any]:
    async with datastore(options) as store, backend() as url:
        runner = Bench(options, store, url)
        await runner.run()
        await runner.fresh()  # leave a --redis as empty as it was found
        return report(runner)


@contextlib.asynccontextmanager
async def datastore(options: Options) -> AsyncIterator[Datastore]:
    """--redis (empty, and with replicas when the replicas scenario needs them), or an
    embedded redis-server."""
    if options.redis_url is None:
        async with embedded(CAMPAIGN) as store:
            yield store
        return
    async with opened(options.redis_url, CAMPAIGN) as store:
        store.description = f"{options.report()['redis']} ({store.description})"
        await require_empty(store)
        if "replicas" in options.scenarios:
            await require_replicas(store)
        yield store


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[str]:
    with reference("backend") as served:
        yield f"http://127.0.0.1:{served.port}"


def report(runner: Bench) -> dict[str, Any]:
    runs = {
        scenario: {name: median_run(rounds) for name, rounds in systems.items()}
        for scenario, systems in runner.runs.items()
    }
    return {
        "machine": machine(),
        "options": {**runner.options.report(), "redis": runner.store.description},
        "runs": runs,
        "idle": runner.idle,
        "targets": targets(runner.runs, runner.idle, runner.options),
    }


def median_run(rounds: list[Run]) -> dict[str, Any]:
    """The round with the median rate, plus every round's rate."""
    ordered = sorted(rounds, key=lambda r: r.tally.rate)
    summary = ordered[len(ordered) // 2].summary()
    summary["rounds_requests_per_second"] = [round(r.tally.rate, 1) for r in rounds]
    checked = [r.verdict["correct"] for r in rounds if r.verdict]
    summary["all_rounds_correct"] = all(checked) if checked else None
    return summary


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def bench_url(url: str, options: Options) -> dict[str, Any]:
    """A crowd against a gateway that is already running (what it saw; no baselines)."""
    parts = urlsplit(url)
    tally = await crowd_run(
        "running gateway",
        parts.port or 80,
        options,
        requests=options.requests,
        path=parts.path or "/",
        host=parts.hostname or "127.0.0.1",
    )
    return {
        "machine": machine(),
        "options": options.report(),
        "runs": {"running": {"gateway": median_run([Run("gateway", tally)])}},
        "idle": None,
        "targets": [],
    }
