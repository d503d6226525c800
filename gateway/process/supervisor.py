"""``flashgate run --workers N``: N processes serving the same ports (SO_REUSEPORT).

The kernel spreads connections over the workers; each has its own event loop,
Redis pool and local flags, and they share everything that matters through
Redis. The parent only supervises: it forwards SIGTERM/SIGINT (drain and stop)
and SIGHUP (reload) to every worker, restarts a worker that dies, and gives up
when workers keep dying right after they start.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from multiprocessing.context import SpawnProcess
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from gateway.process.env import RESPAWNED_ENV, SUPERVISOR_ENV, UNAVAILABLE
from gateway.process.serve import run_worker

log = logging.getLogger(__name__)

#: A worker that dies sooner than this after starting counts as failing to start.
QUICK_DEATH = 5.0
#: That many quick deaths in a row and the supervisor gives up.
MAX_QUICK_DEATHS = 3
#: How long stopping workers get to drain before they are killed.
STOP_GRACE = 30.0


def run_workers(
    config_path: str, redis_url: str, workers: int, log_level: str, dispatch: bool = True
) -> int:
    """Run and supervise ``workers`` processes until SIGTERM or SIGINT; returns an exit code."""
    with _metrics_dir():
        return _supervise(config_path, redis_url, workers, log_level, dispatch)


@contextlib.contextmanager
def _metrics_dir() -> Iterator[None]:
    """Where prometheus-client's multiprocess mode keeps every worker's counters, so that
    whichever worker Prometheus reaches reports them all (a dir given by the operator in
    PROMETHEUS_MULTIPROC_DIR is used and kept)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    directory = tempfile.mkdtemp(prefix="flashgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(directory, ignore_errors=True)


def _supervise(
    config_path: str, redis_url: str, workers: int, log_level: str, dispatch: bool
) -> int:
    worker_args = (config_path, redis_url, log_level, dispatch)
    stopping = False

    def start(index: int) -> tuple[SpawnProcess, float]:
        return _start_worker(index, worker_args), time.monotonic()

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for process, _ in running.values():
            if process.pid and process.is_alive():
                os.kill(process.pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    os.environ[SUPERVISOR_ENV] = str(os.getpid())  # lets a worker's POST /reload reach all
    running: dict[int, tuple[SpawnProcess, float]] = {}
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(workers):
        if not stopping:
            running[index] = start(index)
    os.environ[RESPAWNED_ENV] = "1"  # every worker started from now on replaces one
    quick_deaths = 0
    while not stopping:
        time.sleep(0.2)
        for index, (process, started) in list(running.items()):
            if process.is_alive() or stopping:
                continue
            lived = time.monotonic() - started
            quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH else 0
            _buried(index, process, lived)
            cannot_serve = process.exitcode == UNAVAILABLE  # a port is taken: no use restarting
            if cannot_serve or quick_deaths >= MAX_QUICK_DEATHS:
                log.error("workers cannot serve, or keep dying at start; giving up")
                forward(signal.SIGTERM, None)
                _reap(running.values())
                return UNAVAILABLE if cannot_serve else 1
            running[index] = start(index)
    _reap(running.values())
    return 0


def _buried(index: int, process: SpawnProcess, lived: float) -> None:
    """Note a dead worker, and drop its live metrics (gauges of a process that is gone)."""
    if process.pid is not None:
        mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
    log.error(
        "worker %d (pid %s) exited with %s after %.1fs", index, process.pid, process.exitcode, lived
    )


def _start_worker(index: int, args: tuple[str, str, str, bool]) -> SpawnProcess:
    process = multiprocessing.get_context("spawn").Process(
        target=run_worker, args=args, name=f"flashgate-worker-{index}"
    )
    # The worker starts with SIGHUP blocked (a mask survives fork and exec) and
    # unblocks it once its handler is in place: a reload forwarded meanwhile waits
    # instead of killing it (SIGHUP's default).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    log.info("worker %d started (pid %s)", index, process.pid)
    return process


def _reap(workers: Iterable[tuple[SpawnProcess, float]]) -> None:
    deadline = time.monotonic() + STOP_GRACE
    for process, _ in list(workers):
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker pid %s did not stop in time; killing it", process.pid)
            process.kill()
            process.join()
