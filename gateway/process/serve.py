"""Serving one process: the edge and admin sites, signals, and a draining shutdown;
and the entry point of a worker under ``--workers``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from aiohttp import web

from gateway.config import ConfigError, Settings, load_settings
from gateway.contract.openapi import document as openapi_document
from gateway.core.runtime import Runtime
from gateway.edge.context import Edge
from gateway.edge.server import create_server
from gateway.embedded.server import die_with_parent
from gateway.operations.admin import Admin, create_admin_app
from gateway.process.env import (
    OK,
    RESPAWNED_ENV,
    SUPERVISOR_ENV,
    UNAVAILABLE,
    configure_logging,
    install_uvloop,
)

log = logging.getLogger(__name__)

#: Set by a SIGHUP that reached a worker while it was still starting.
EARLY_RELOAD = threading.Event()
#: In-flight requests get this long to finish after SIGTERM.
DRAIN_SECONDS = 10.0
#: Pending connections the kernel keeps for us while a flash crowd arrives.
BACKLOG = 4096


def edge_parts(runtime: Runtime) -> Edge:
    """The edge's view of a running process."""
    return Edge(
        runtime.live,
        runtime.watch,
        runtime.access,
        runtime.publisher.hot,
        runtime.readiness,
        runtime.rebalancer,
    )


def admin_parts(runtime: Runtime, *, under_supervisor: bool = False) -> Admin:
    """The admin API's view of a running process; ``under_supervisor``: a worker of
    ``--workers``, whose reloads go through the supervisor to every worker."""
    return Admin(
        runtime.live,
        runtime.watch,
        runtime.readiness,
        runtime.reloader,
        runtime.publisher,
        runtime.actor,
        lambda: runtime.heartbeat.processes,
        _reload_every_worker if under_supervisor else None,
        lambda: openapi_document(runtime.live.current.settings),
    )


def _reload_every_worker() -> None:
    os.kill(os.getppid(), signal.SIGHUP)


def _supervised() -> bool:
    """Whether this process is a worker of ``flashgate run --workers``."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    return bool(supervisor) and supervisor == str(os.getppid())


async def serve(
    settings: Settings,
    redis_url: str,
    *,
    reuse_port: bool = False,
    dispatch: bool = True,
    config_path: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and close; SIGHUP reloads the config."""
    stop = _stop_on_signals()
    respawned = bool(os.environ.get(RESPAWNED_ENV))
    async with Runtime.open(
        settings, redis_url, dispatch=dispatch, config_path=config_path, respawned=respawned
    ) as runtime:
        _reload_on_sighup(runtime)
        edge = web.ServerRunner(create_server(edge_parts(runtime)), **RUNNER)
        runners = [await _start(edge, settings.gateway.host, settings.gateway.port, reuse_port)]
        if settings.admin is not None:
            admin = create_admin_app(
                admin_parts(runtime, under_supervisor=_supervised()),
                metrics_need_token=settings.admin.metrics_need_token,
            )
            admin_runner = web.AppRunner(admin, access_log=None, **RUNNER)
            try:
                runners.append(
                    await _start(admin_runner, settings.admin.host, settings.admin.port, reuse_port)
                )
            except CannotListen:
                await edge.cleanup()
                raise
        names = ("buyers", "admin API")
        log.info(
            "ready: %s",
            ", ".join(f"{name} on {url}" for name, url in zip(names, _urls(runners), strict=False)),
        )
        await stop.wait()
        runtime.readiness.draining = True
        log.info("stopping: draining in-flight requests (up to %gs)", DRAIN_SECONDS)
        for runner in runners:
            await runner.cleanup()
    log.info("stopped")


async def dispatch_only(settings: Settings, redis_url: str, config_path: str) -> None:
    """``flashgate dispatch``: deliver queued orders (and sweep deadlines), no HTTP."""
    stop = _stop_on_signals()
    async with Runtime.open(settings, redis_url, dispatch=True, config_path=config_path) as runtime:
        _reload_on_sighup(runtime)
        log.info("dispatching for %d campaign(s)", len(settings.campaigns))
        await stop.wait()
        log.info("stopping: finishing deliveries in flight")


def _reload_on_sighup(runtime: Runtime) -> None:
    async def reload() -> None:
        if runtime.reloader.path is not None:
            with contextlib.suppress(ConfigError):  # logged and counted; the old config stays
                await runtime.reloader.reload()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: runtime.spawn(reload()))
    if EARLY_RELOAD.is_set():  # the file may have changed after this process read it
        EARLY_RELOAD.clear()
        runtime.spawn(reload())


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


#: How the runners of both ports stop: drain, and leave signals to us.
RUNNER: dict[str, Any] = {"handle_signals": False, "shutdown_timeout": DRAIN_SECONDS}


class CannotListen(Exception):
    """A port this gateway must serve is taken (or not allowed): no use trying again."""


async def _start(runner: web.BaseRunner, host: str, port: int, reuse_port: bool) -> web.BaseRunner:
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=BACKLOG)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner


def _urls(runners: list[web.BaseRunner]) -> list[str]:
    """Where each runner listens (its first address)."""
    return [
        f"http://{runner.addresses[0][0]}:{runner.addresses[0][1]}"
        for runner in runners
        if runner.addresses
    ]


def serve_forever(
    settings: Settings,
    redis_url: str,
    *,
    reuse_port: bool = False,
    dispatch: bool = True,
    config_path: str | None = None,
) -> int:
    """Serve until stopped; the exit code (UNAVAILABLE when a port is taken)."""
    install_uvloop()
    try:
        asyncio.run(
            serve(
                settings,
                redis_url,
                reuse_port=reuse_port,
                dispatch=dispatch,
                config_path=config_path,
            )
        )
    except CannotListen as exc:
        log.error("%s", exc)
        return UNAVAILABLE
    return OK


def run_worker(config_path: str, redis_url: str, log_level: str, dispatch: bool) -> None:
    """One worker of ``--workers``: its own event loop and Redis pool, on the shared ports."""
    # A reload forwarded while this worker still starts (held back by the blocked
    # signal until now) is remembered; serving reloads once its own handler is in place.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: EARLY_RELOAD.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    die_with_parent()
    configure_logging(log_level)
    settings = load_settings(config_path)
    configure_logging(log_level, settings.logging.format)
    sys.exit(
        serve_forever(
            settings,
            redis_url,
            reuse_port=True,
            dispatch=dispatch,
            config_path=config_path,
        )
    )
