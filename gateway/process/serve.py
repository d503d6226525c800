"""Serving one process: the edge and admin sites, signals, and a draining shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from aiohttp import web

from gateway.config import ConfigError, Settings
from gateway.core.reload import reload_file
from gateway.core.runtime import Runtime
from gateway.edge.server import create_server
from gateway.operations.admin import create_admin_app
from gateway.process.supervisor import EARLY_RELOAD

log = logging.getLogger(__name__)

#: In-flight requests get this long to finish after SIGTERM.
DRAIN_SECONDS = 10.0
#: Pending connections the kernel keeps for us while a flash crowd arrives.
BACKLOG = 4096


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
    async with Runtime.open(
        settings, redis_url, dispatch=dispatch, config_path=config_path
    ) as runtime:
        _reload_on_sighup(runtime)
        edge = web.ServerRunner(create_server(runtime), **RUNNER)
        runners = [await _start(edge, settings.gateway.host, settings.gateway.port, reuse_port)]
        if settings.admin is not None:
            admin = create_admin_app(runtime, metrics_need_token=settings.admin.metrics_need_token)
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
        runtime.draining = True
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
        if runtime.config_path is not None:
            with contextlib.suppress(ConfigError):  # logged and counted; the old config stays
                await reload_file(runtime, runtime.config_path)

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
