"""The ``idle`` scenario: what a gateway costs while nobody buys, by the size of its
catalogue.

A gateway with N campaigns (``--idle-campaigns``, default 1, 100 and 1,000), with
one worker and then two, and no traffic. It is left to settle for
``--idle-settle`` seconds (start-up reads every campaign once), then measured over
``--idle-window`` seconds:

* **Redis commands a second**: total_commands_processed, summed over every primary,
  read before and after the window, each node on one connection opened beforehand.
  Redis counts a command once it has run, so the first reading's INFO shows in the
  second reading and the second in neither: one command per node is the bench's
  own and is taken off (the same reading's commandstats say which commands they
  were). What Redis runs with no gateway at all (on a Sentinel
  topology: the sentinels' PINGs, INFOs and hellos, the replicas' REPLCONF ACKs) is
  measured the same way over one window before the first gateway starts, reported,
  and taken off for the net figure.
* **CPU per process**: utime + stime from /proc/<pid>/stat of the gateway process
  and of each of its children (the workers under ``--workers 2``, and
  multiprocessing's resource tracker beside them), the difference over the window
  as a percentage of one core.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.bench.datastore import Datastore
from gateway.bench.options import Options
from gateway.bench.systems import flashgate

#: Stock of each idle campaign: on sale, not sold out.
IDLE_STOCK = 100
WORKERS = (1, 2)
_TICKS = os.sysconf("SC_CLK_TCK")


async def measure_idle(
    options: Options, store: Datastore, backend: str, fresh: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    window = options.idle_window
    await fresh()
    background, _ = await _commands_per_second(store, window)
    gateways = []
    for campaigns in options.idle_campaigns:
        for workers in WORKERS:
            await fresh()
            config = {"campaigns": campaigns, "workers": workers}
            with flashgate(store.url, backend, IDLE_STOCK, **config) as served:
                assert served.pid is not None
                await asyncio.sleep(options.idle_settle)
                figures = await _idle_window(store, served.pid, workers, window, background)
            gateways.append({"campaigns": campaigns, "workers": workers, **figures})
    return {
        "window_seconds": window,
        "settle_seconds": options.idle_settle,
        "redis_background_commands_per_second": round(background, 2),
        "gateways": gateways,
    }


async def _commands_per_second(store: Datastore, window: float) -> tuple[float, dict[str, float]]:
    """Commands Redis ran a second over ``window``, the bench's own INFO taken off;
    and by command (the busiest first), to show where they come from."""
    (before, calls_before), started = await store.processed(), time.monotonic()
    await asyncio.sleep(window)
    (after, calls_after), elapsed = await store.processed(), time.monotonic() - started
    calls = calls_after - calls_before
    calls["info"] -= len(store.primaries)
    by_name = {name: round(n / elapsed, 2) for name, n in calls.most_common() if n > 0}
    return (after - before - len(store.primaries)) / elapsed, by_name


async def _idle_window(
    store: Datastore, root: int, workers: int, window: float, background: float
) -> dict[str, Any]:
    processes = gateway_processes(root, workers)
    cpu_before, started = _cpu(processes), time.monotonic()
    rate, by_name = await _commands_per_second(store, window)
    cpu_after, elapsed = _cpu(processes), time.monotonic() - started
    shown = [
        {
            "pid": pid,
            "role": role,
            "cpu_percent_of_a_core": _percent(pid, cpu_before, cpu_after, elapsed),
        }
        for pid, role in processes.items()
    ]
    shares = [p["cpu_percent_of_a_core"] for p in shown if p["cpu_percent_of_a_core"] is not None]
    return {
        "seconds": round(elapsed, 3),
        "redis_commands_per_second": round(rate, 2),
        "redis_commands_per_second_net": round(max(0.0, rate - background), 2),
        "redis_commands_per_second_by_name": by_name,
        "processes": shown,
        "max_cpu_percent_of_a_core": max(shares) if shares else None,
    }


def _percent(
    pid: int, before: dict[int, float | None], after: dict[int, float | None], elapsed: float
) -> float | None:
    """A process's CPU over the window, in % of one core (None: it went away)."""
    start, end = before.get(pid), after.get(pid)
    if start is None or end is None:
        return None
    return round((end - start) / elapsed * 100, 3)


def gateway_processes(root: int, workers: int) -> dict[int, str]:
    """The gateway process and its children, by pid, each with its role."""
    found = {root: "supervisor" if workers > 1 else "gateway"}
    for pid in _children(root):
        command = _read(pid, "cmdline")
        found[pid] = "resource tracker" if b"resource_tracker" in command else "worker"
    return found


def _children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (from every /proc/<pid>/stat: no kernel option needed)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                children.append(int(entry.name))
    return sorted(children)


def _cpu(processes: dict[int, str]) -> dict[int, float | None]:
    """utime + stime of each process, in seconds (None: it is gone)."""
    seconds: dict[int, float | None] = {}
    for pid in processes:
        fields = _stat(pid)
        seconds[pid] = None if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS
    return seconds


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces): field 3 on."""
    text = _read(pid, "stat").decode(errors="replace")
    return text.rpartition(")")[2].split() if text else None


def _read(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""
