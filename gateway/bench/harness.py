"""``flashgate bench``: flash sales on this machine, flashgate against the naive design
and a bare aiohttp server, every figure a ratio measured in the same run.

Each system under test runs in its own process (so does Redis, and the stub order
backend); the crowd runs here. Between runs Redis is flushed and the backend
forgets its orders. Scenarios:

* ``oversubscribed``: stock = 1 % of the requests, 256 connections: naive vs
  flashgate throughput, both checked for correctness;
* ``sold-out``: every request after the sale: flashgate vs hello-world, and the
  Redis calls it made (none expected);
* ``round-trips``: Redis round trips per request that reached the deduction
  stage, read from flashgate's own metrics in the oversubscribed run;
* ``latency``: the latency flashgate adds over calling the backend directly, at
  half of flashgate's saturated rate, paced;
* ``workers``: the sold-out path with ``--workers 2`` against one worker;
* ``access-log``: the sold-out path logging every refusal against not logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gateway.bench import SCENARIOS
from gateway.bench.crowd import Crowd, Tally, run_crowd
from gateway.bench.wrk import available as wrk_available
from gateway.bench.wrk import run_wrk
from gateway.embedded.server import EmbeddedRedis, free_port
from gateway.operations.terminal import Progress

CAMPAIGN = "bench"
PATH = "/seckill/bench"
TOKEN = "bench-admin-token-not-secret"
#: The latency comparison at ``--latency-rate``.
FIXED_RATE = "latency at a fixed rate"


@dataclass(frozen=True)
class Options:
    requests: int = 20_000
    seconds: float = 3.0
    concurrency: int = 256
    buyers: int | None = None
    #: Stock of the oversubscribed sale (default: 1 % of the requests).
    stock: int | None = None
    scenarios: tuple[str, ...] = SCENARIOS
    #: Each comparison runs this many times, its systems alternating.
    rounds: int = 3
    #: Load generator of throughput-only runs: "crowd", "wrk", or "auto" (wrk if found).
    generator: str = "auto"
    #: Pace the latency comparison at this rate too (requests/s), besides half and a
    #: tenth of the saturated rate: the same rate on two versions compares their cost.
    latency_rate: float | None = None
    progress: bool = True


@dataclass
class Run:
    """One crowd against one system: what the crowd saw, what Redis and the backend did."""

    name: str
    tally: Tally
    redis_commands: int = 0
    round_trips: float | None = None
    decided: int | None = None
    verdict: dict[str, Any] | None = None
    #: What sent the requests: the built-in crowd, or wrk.
    generator: str = "crowd"

    def summary(self) -> dict[str, Any]:
        tally = self.tally
        return {
            "generator": self.generator,
            "requests": tally.sent,
            "seconds": round(tally.elapsed, 3),
            "requests_per_second": round(tally.rate, 1),
            "p50_ms": round(tally.quantile(0.5) * 1000, 3),
            "p90_ms": round(tally.quantile(0.9) * 1000, 3),
            "p99_ms": round(tally.quantile(0.99) * 1000, 3),
            "outcomes": {
                code: _outcome(tally, code, count) for code, count in sorted(tally.outcomes.items())
            },
            "redis_commands_per_request": round(self.redis_commands / max(tally.sent, 1), 4),
            "redis_round_trips_per_decision": self.round_trips,
            "decided": self.decided,
            "upstream_calls": self.verdict.get("backend_calls") if self.verdict else None,
            "verdict": self.verdict,
        }


def _outcome(tally: Tally, code: str, count: int) -> dict[str, Any]:
    """How many answers had this outcome, and (when it can be known) how fast."""
    figures: dict[str, Any] = {"count": count}
    for share, name in ((0.5, "p50_ms"), (0.9, "p90_ms"), (0.99, "p99_ms")):
        seconds = tally.outcome_quantile(code, share)
        if seconds is not None:
            figures[name] = round(seconds * 1000, 3)
    return figures


# ------------------------------------------------------------------ processes


@contextlib.contextmanager
def process(command: list[str], ready: Callable[[], bool], name: str) -> Iterator[None]:
    """Run ``command`` until the block ends; ``ready`` says when it serves."""
    with tempfile.TemporaryFile(prefix=f"flashgate-bench-{name}-") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not ready():
                if child.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    said = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} did not start: {said}")
                time.sleep(0.05)
            yield
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:  # loopback only
                return bool(response.status == 200)
        except OSError:
            return False

    return check


def _servers(kind: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway.bench.servers", kind, "--port", str(port), *extra]


@dataclass
class Flashgate:
    port: int
    admin_port: int

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@contextlib.contextmanager
def flashgate(
    redis_url: str,
    backend: str,
    stock: int,
    *,
    workers: int = 1,
    local_refusals: bool = False,
    per_user_limit: int = 1,
) -> Iterator[Flashgate]:
    target = Flashgate(free_port(), free_port())
    config = {
        "redis": {"url": redis_url},
        "gateway": {"port": target.port},
        "admin": {"port": target.admin_port, "token": TOKEN},
        "access_log": {
            "enabled": local_refusals,
            "path": os.devnull,
            "local_refusals": local_refusals,
        },
        "upstreams": {"shop": {"url": backend, "timeout": 5.0}},
        "campaigns": [
            {
                "id": CAMPAIGN,
                "route": f"POST {PATH}",
                "upstream": "shop",
                "stock": stock,
                "per_user_limit": per_user_limit,
            }
        ],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(config, file)
    command = [
        sys.executable,
        "-m",
        "gateway",
        "--log-level",
        "warning",
        "run",
        "-c",
        file.name,
        "--workers",
        str(workers),
    ]
    try:
        with process(command, _answers(f"http://127.0.0.1:{target.port}/readyz"), "flashgate"):
            _wait_for_workers(target, workers)
            yield target
    finally:
        os.unlink(file.name)


def _wait_for_workers(target: Flashgate, workers: int) -> None:
    """With --workers N, wait until N processes have said they are alive."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _gauge(_scrape(target.admin), "flashgate_gateway_processes") >= workers:
            return
        time.sleep(0.1)


def _scrape(admin: str) -> str:
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as response:  # loopback only
        return str(response.read().decode())


def _gauge(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------ measuring


async def _commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",))


async def _orders(backend: str) -> dict[str, Any]:
    return await asyncio.to_thread(_get_json, f"{backend}/_orders")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        document: dict[str, Any] = json.loads(response.read())
        return document


def _post(url: str) -> None:
    request = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(request, timeout=5):  # loopback only
        pass


async def crowd_run(
    name: str,
    port: int,
    options: Options,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    rate: float | None = None,
    path: str = PATH,
    buyers: int | None = None,
    concurrency: int | None = None,
    host: str = "127.0.0.1",
) -> Tally:
    total = requests if requests is not None else None
    crowd = Crowd(
        host=host,
        port=port,
        path=path,
        buyers=buyers or options.buyers or max(total or 0, 1_000_000),
        concurrency=concurrency or options.concurrency,
        requests=total,
        duration=seconds,
        rate=rate,
    )
    progress = Progress(total or 0, f"{name:<24}", enabled=options.progress and bool(total))
    tally = await run_crowd(crowd, on_answer=progress.advance if progress.enabled else None)
    progress.close()
    return tally


async def verdict(
    redis: Redis, backend: str, tally: Tally, per_user_limit: int = 1
) -> dict[str, Any]:
    """Nothing oversold, nobody above the limit, the backend saw exactly the winners."""
    raw: dict[bytes, bytes] = await redis.hgetall(f"fg:{{{CAMPAIGN}}}:state")  # type: ignore[assignment]
    state = {k.decode(): int(v) for k, v in raw.items() if v.lstrip(b"-").isdigit()}
    seen = await _orders(backend)
    units: dict[str, int] = {}
    for user, quantity in seen["orders"].values():
        units[user] = units.get(user, 0) + quantity
    sold_units = sum(q for _, q in seen["orders"].values())
    total = state.get("stock_total", 0)
    checks = {
        "books_balance": total
        == state.get("available", 0) + state.get("reserved", 0) + state.get("sold", 0),
        "sold_exactly_the_stock": sold_units == state.get("sold") == total,
        "nobody_above_the_limit": all(u <= per_user_limit for u in units.values()),
        "backend_saw_exactly_the_winners": set(seen["orders"]) == set(tally.wins),
        "no_duplicate_deliveries": seen["duplicates"] == 0,
    }
    return {
        "correct": all(checks.values()),
        **checks,
        "stock_total": total,
        "sold": state.get("sold"),
        "oversold": max(0, sold_units - total),
        "backend_calls": seen["calls"],
    }


# ------------------------------------------------------------------ scenarios


System = Callable[[], contextlib.AbstractContextManager[int]]
Load = Callable[[str, int], Awaitable[Run]]


class Bench:
    def __init__(self, options: Options, redis: EmbeddedRedis, backend: str) -> None:
        self.options = options
        self.redis_server = redis
        self.backend = backend
        self.redis = Redis.from_url(redis.url)
        #: scenario -> system -> one Run per round
        self.runs: dict[str, dict[str, list[Run]]] = {}

    async def fresh(self) -> None:
        await self.redis.flushall()
        await asyncio.to_thread(_post, f"{self.backend}/_reset")

    async def compare(self, scenario: str, systems: dict[str, System], load: Load) -> None:
        """Every system, round after round, each time from a fresh Redis and backend:
        alternating them spreads the machine's noise over all of them alike."""
        runs = self.runs.setdefault(scenario, {})
        for _ in range(self.options.rounds):
            for name, system in systems.items():
                await self.fresh()
                with system() as port:
                    runs.setdefault(name, []).append(await load(name, port))

    # --- systems

    def naive(self, stock: int) -> System:
        @contextlib.contextmanager
        def start() -> Iterator[int]:
            port = free_port()
            command = _servers(
                "naive",
                port,
                "--redis",
                self.redis_server.url,
                "--upstream",
                self.backend,
                "--campaign",
                CAMPAIGN,
            )
            with process(command, _answers_tcp(port), "naive"):
                _seed(self.redis_server.url, stock)
                yield port

        return start

    def flashgate(self, stock: int, **options: Any) -> System:
        @contextlib.contextmanager
        def start() -> Iterator[int]:
            with flashgate(self.redis_server.url, self.backend, stock, **options) as gw:
                self._admin = gw.admin
                yield gw.port

        return start

    def hello(self) -> System:
        @contextlib.contextmanager
        def start() -> Iterator[int]:
            port = free_port()
            with process(_servers("hello", port), _answers_tcp(port), "hello"):
                yield port

        return start

    def backend_direct(self) -> System:
        @contextlib.contextmanager
        def start() -> Iterator[int]:
            yield int(self.backend.rsplit(":", 1)[1])

        return start

    # --- loads

    def sale(self, requests: int) -> Load:
        """A sale of ``requests`` requests, checked for correctness; Redis work counted."""

        async def load(name: str, port: int) -> Run:
            before = await _commands(self.redis)
            metrics = await self._metrics(name)
            tally = await crowd_run(f"{name}: sale", port, self.options, requests=requests)
            commands = await _commands(self.redis) - before
            decided = int(await self.redis.hget(f"fg:{{{CAMPAIGN}}}:state", "decided") or 0)
            run = Run(
                name,
                tally,
                commands,
                decided=decided,
                verdict=await verdict(self.redis, self.backend, tally),
            )
            if metrics is not None:
                await asyncio.sleep(1.2)  # the gateway publishes its counters every second
                trips = _gauge(await self._metrics(name) or "", ROUND_TRIPS) - _gauge(
                    metrics, ROUND_TRIPS
                )
                run.round_trips = round(trips / max(decided, 1), 4)
            return run

        return load

    def timed(
        self,
        seconds: float,
        *,
        rate: float | None = None,
        path: str = PATH,
        throughput_only: bool = False,
    ) -> Load:
        """A run of ``seconds``: paced at ``rate``, or as fast as answers come back; a
        ``throughput_only`` run goes to wrk when the options allow it (see wrk.py)."""
        use_wrk = throughput_only and rate is None and _wants_wrk(self.options.generator)

        async def load(name: str, port: int) -> Run:
            before = await _commands(self.redis)
            if use_wrk:
                url = f"http://127.0.0.1:{port}{path}"
                tally = await run_wrk(url, seconds=seconds, concurrency=self.options.concurrency)
            else:
                tally = await crowd_run(
                    name,
                    port,
                    self.options,
                    seconds=seconds,
                    rate=rate,
                    path=path,
                    concurrency=64 if rate else None,
                )
            commands = await _commands(self.redis) - before
            return Run(name, tally, commands, generator="wrk" if use_wrk else "crowd")

        return load

    async def _metrics(self, name: str) -> str | None:
        if name != "flashgate":
            return None
        return await asyncio.to_thread(_scrape, self._admin)

    # --- scenarios

    async def oversubscribed(self) -> None:
        requests = self.options.requests
        stock = self.options.stock or max(1, requests // 100)
        await self.compare(
            "oversubscribed",
            {
                "naive": self.naive(stock),
                "flashgate": self.flashgate(stock),
            },
            self.sale(requests),
        )

    async def sold_out(self) -> None:
        await self.compare(
            "sold-out",
            {
                "hello": self.hello(),
                "flashgate": self.flashgate(stock=0),
            },
            self.timed(self.options.seconds, throughput_only=True),
        )

    async def latency(self) -> None:
        """Saturate the winning path, then pace flashgate and the backend at half of it."""
        everyone_wins = self.flashgate(stock=10**9, per_user_limit=10**9)
        await self.compare(
            "saturated", {"flashgate": everyone_wins}, self.timed(self.options.seconds)
        )
        saturated = statistics.median(r.tally.rate for r in self.runs["saturated"]["flashgate"])
        systems = {"flashgate": everyone_wins, "direct": self.backend_direct()}
        rates = {"latency": saturated * 0.5, "latency at a tenth": saturated * 0.1}
        if self.options.latency_rate:
            rates[FIXED_RATE] = self.options.latency_rate
        for scenario, rate in rates.items():
            pace = self.timed(self.options.seconds, rate=rate, path=PATH)
            await self.compare(scenario, systems, pace)

    async def workers(self) -> None:
        await self.compare(
            "workers",
            {
                "workers=1": self.flashgate(stock=0),
                "workers=2": self.flashgate(stock=0, workers=2),
            },
            self.timed(self.options.seconds, throughput_only=True),
        )

    async def access_log(self) -> None:
        await self.compare(
            "access-log",
            {
                "not logging refusals": self.flashgate(stock=0),
                "logging every refusal": self.flashgate(stock=0, local_refusals=True),
            },
            self.timed(self.options.seconds, throughput_only=True),
        )

    async def run(self) -> dict[str, Any]:
        chosen = self.options.scenarios
        if "oversubscribed" in chosen or "round-trips" in chosen:
            await self.oversubscribed()
        if "sold-out" in chosen:
            await self.sold_out()
        if "latency" in chosen:
            await self.latency()
        if "workers" in chosen:
            await self.workers()
        if "access-log" in chosen:
            await self.access_log()
        await self.redis.aclose()
        return self.report()

    def report(self) -> dict[str, Any]:
        runs = {
            scenario: {name: _median_run(rounds) for name, rounds in systems.items()}
            for scenario, systems in self.runs.items()
        }
        return {
            "machine": machine(),
            "options": _options(self.options),
            "runs": runs,
            "targets": targets(self.runs, self.options.latency_rate),
        }


ROUND_TRIPS = "flashgate_redis_seconds_count"


def _median_run(rounds: list[Run]) -> dict[str, Any]:
    """The round with the median rate, plus every round's rate."""
    ordered = sorted(rounds, key=lambda r: r.tally.rate)
    summary = ordered[len(ordered) // 2].summary()
    summary["rounds_requests_per_second"] = [round(r.tally.rate, 1) for r in rounds]
    summary["all_rounds_correct"] = all(r.verdict["correct"] for r in rounds if r.verdict) or None
    return summary


def _wants_wrk(generator: str) -> bool:
    if generator == "wrk" and not wrk_available():
        raise RuntimeError("--generator wrk: wrk is not on PATH (apt-get install wrk)")
    return generator == "wrk" or (generator == "auto" and wrk_available())


def _answers_tcp(port: int) -> Callable[[], bool]:
    import socket

    def check() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    return check


def _seed(redis_url: str, stock: int) -> None:
    """The naive server creates nothing: give it the counters flashgate would."""
    client = SyncRedis.from_url(redis_url)
    client.hset(
        f"fg:{{{CAMPAIGN}}}:state",
        mapping={"available": stock, "reserved": 0, "sold": 0, "stock_total": stock},
    )
    client.close()


def _options(options: Options) -> dict[str, Any]:
    return {
        "requests": options.requests,
        "seconds": options.seconds,
        "concurrency": options.concurrency,
        "rounds": options.rounds,
        "scenarios": list(options.scenarios),
        "generator": options.generator,
        "latency_rate": options.latency_rate,
    }


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


def _median_rate(runs: dict[str, dict[str, list[Run]]], scenario: str, name: str) -> float | None:
    rounds = runs.get(scenario, {}).get(name)
    return statistics.median(r.tally.rate for r in rounds) if rounds else None


def _ratios(runs: dict[str, dict[str, list[Run]]], scenario: str, a: str, b: str) -> float | None:
    """The median over rounds of round-by-round ratios (each pair ran back to back)."""
    pairs = zip(runs.get(scenario, {}).get(a, []), runs.get(scenario, {}).get(b, []), strict=False)
    ratios = [x.tally.rate / y.tally.rate for x, y in pairs if y.tally.rate]
    return round(statistics.median(ratios), 3) if ratios else None


def _added_p99(runs: dict[str, dict[str, list[Run]]], scenario: str) -> float:
    """Milliseconds flashgate adds to the backend's p99 (medians over the rounds)."""

    def p99(name: str) -> float:
        return statistics.median(r.tally.quantile(0.99) for r in runs[scenario][name])

    return (p99("flashgate") - p99("direct")) * 1000


def targets(
    runs: dict[str, dict[str, list[Run]]], latency_rate: float | None = None
) -> list[dict[str, Any]]:
    """The five goals, each with what this run measured."""
    found: list[dict[str, Any]] = []
    if "oversubscribed" in runs:
        ratio = _ratios(runs, "oversubscribed", "flashgate", "naive")
        correct = all(
            r.verdict and r.verdict["correct"] for rs in runs["oversubscribed"].values() for r in rs
        )
        found.append(
            {
                "target": "a. oversubscribed sale: flashgate vs naive throughput",
                "goal": ">= 2x, both correct",
                "measured": ratio,
                "met": bool(ratio and ratio >= 2.0 and correct),
            }
        )
        trips = statistics.median(r.round_trips or 0 for r in runs["oversubscribed"]["flashgate"])
        found.append(
            {
                "target": "c. Redis round trips per request reaching the deduction",
                "goal": "< 0.5 at >= 256 connections",
                "measured": round(trips, 3),
                "met": trips < 0.5,
            }
        )
    if "sold-out" in runs:
        ratio = _ratios(runs, "sold-out", "flashgate", "hello")
        calls = statistics.median(r.redis_commands for r in runs["sold-out"]["flashgate"])
        found.append(
            {
                "target": "b. after sold-out: flashgate vs bare aiohttp+uvloop",
                "goal": ">= 0.9x, no Redis calls for requests",
                "measured": ratio,
                "redis_commands_during_run": calls,
                "met": bool(ratio and ratio >= 0.9),
            }
        )
    if "latency" in runs:
        added = _added_p99(runs, "latency")
        found.append(
            {
                "target": "d. p99 latency added over the backend, at half the saturated rate",
                "goal": "<= 2 ms",
                "measured": round(added, 3),
                "met": added <= 2.0,
            }
        )
    if "latency at a tenth" in runs:
        found.append(
            {
                "target": "   the same at a tenth of the saturated rate (for comparison)",
                "goal": "-",
                "measured": round(_added_p99(runs, "latency at a tenth"), 3),
                "met": None,
            }
        )
    if FIXED_RATE in runs:
        found.append(
            {
                "target": f"   the same at {latency_rate:,g} requests/s (--latency-rate)",
                "goal": "-",
                "measured": round(_added_p99(runs, FIXED_RATE), 3),
                "met": None,
            }
        )
    if "workers" in runs:
        ratio = _ratios(runs, "workers", "workers=2", "workers=1")
        found.append(
            {
                "target": "e. --workers 2 vs 1 (sold-out path, no Redis)",
                "goal": ">= 1.6x",
                "measured": ratio,
                "met": bool(ratio and ratio >= 1.6),
            }
        )
    if "access-log" in runs:
        quiet = _median_rate(runs, "access-log", "not logging refusals")
        loud = _median_rate(runs, "access-log", "logging every refusal")
        cost = (1 / loud - 1 / quiet) * 1e6 if loud and quiet else None
        found.append(
            {
                "target": "access log: cost per logged request (from throughput)",
                "goal": "measured",
                "measured": round(cost, 2) if cost is not None else None,
                "met": True,
            }
        )
    return found


@contextlib.asynccontextmanager
async def infrastructure() -> AsyncIterator[tuple[EmbeddedRedis, str]]:
    with EmbeddedRedis() as redis:
        port = free_port()
        with process(
            _servers("backend", port), _answers(f"http://127.0.0.1:{port}/_orders"), "backend"
        ):
            yield redis, f"http://127.0.0.1:{port}"


async def bench(options: Options) -> dict[str, Any]:
    async with infrastructure() as (redis, backend):
        return await Bench(options, redis, backend).run()


async def bench_url(url: str, options: Options) -> dict[str, Any]:
    """A crowd against a gateway that is already running (what it saw; no baselines)."""
    from urllib.parse import urlsplit

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
        "options": _options(options),
        "runs": {"running": {"gateway": _median_run([Run("gateway", tally)])}},
        "targets": [],
    }
