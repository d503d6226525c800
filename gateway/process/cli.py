"""The ``flashgate`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from gateway.bench import SCENARIOS
from gateway.config import ConfigError, Settings, load_settings
from gateway.embedded.server import EmbeddedRedis, EmbeddedRedisError
from gateway.process.env import (
    EXIT_CODES,
    FAILED,
    INTERRUPTED,
    INVALID,
    OK,
    UNAVAILABLE,
    WORKERS_ENV,
    configure_logging,
    install_uvloop,
)
from limiter.errors import StorageError

log = logging.getLogger("flashgate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return INVALID
    except EmbeddedRedisError as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return UNAVAILABLE
    except KeyboardInterrupt:
        return INTERRUPTED


def _version() -> str:
    try:
        return importlib.metadata.version("flashgate")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashgate",
        description="Flash-sale admission gateway.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"flashgate {_version()}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve the campaigns of a config file")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes serving the same ports (default: $FLASHGATE_WORKERS, else the CPUs "
        "this process may use, container quota included)",
    )
    run.add_argument(
        "--no-dispatch",
        action="store_true",
        help="do not deliver queued orders here (run `flashgate dispatch` elsewhere)",
    )
    run.set_defaults(command=cmd_run)

    dispatch = commands.add_parser(
        "dispatch", help="deliver queue-mode orders to the backends (no HTTP serving)"
    )
    dispatch.add_argument("-c", "--config", required=True, help="YAML config file")
    dispatch.set_defaults(command=cmd_dispatch)

    check = commands.add_parser("check", help="validate a config file (exit 2 when invalid)")
    check.add_argument("-c", "--config", required=True, help="YAML config file")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(command=cmd_check)

    openapi = commands.add_parser(
        "openapi", help="print the OpenAPI 3.1 document of a config file (JSON)"
    )
    openapi.add_argument("-c", "--config", required=True, help="YAML config file")
    openapi.set_defaults(command=cmd_openapi)

    reconcile = commands.add_parser(
        "reconcile",
        help="check counters against reservation records and the ledger (exit 1 on drift)",
    )
    reconcile.add_argument("-c", "--config", required=True, help="YAML config file")
    reconcile.add_argument("--campaign", help="only this campaign (or cart)")
    reconcile.add_argument(
        "--repair", action="store_true", help="make the counters agree with the records"
    )
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")
    reconcile.set_defaults(command=cmd_reconcile)

    status = commands.add_parser("status", help="a table of the campaigns, read from Redis")
    status.add_argument("-c", "--config", required=True, help="YAML config file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch",
        action="store_true",
        help="a line per campaign every --interval, with what sold since (like redis-cli --stat)",
    )
    status.add_argument(
        "--interval", type=_positive_float, default=1.0, help="seconds between lines (default 1)"
    )
    status.set_defaults(command=cmd_status)

    from gateway.process.admin_client import add_arguments as admin_arguments

    admin = commands.add_parser(
        "admin",
        help="call the admin API: stock, cancel, confirm, reload, dead-letters",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    admin_arguments(admin)
    admin.set_defaults(command=cmd_admin)

    _add_bench(
        commands.add_parser(
            "bench", help="flash sales on this machine: flashgate vs the naive designs, as ratios"
        )
    )

    demo = commands.add_parser("demo", help="a whole flash sale on this machine, then a report")
    from gateway.process.demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(command=cmd_demo)
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        if args.json:
            problems = [{"path": path, "reason": reason} for path, reason in exc.problems]
            print(json.dumps({"file": exc.source, "valid": False, "problems": problems}))
            return INVALID
        raise
    campaigns = [c.id for c in settings.campaigns]
    summary = {
        "file": args.config,
        "valid": True,
        "campaigns": campaigns,
        "upstreams": list(settings.upstreams),
        "redis": settings.redis.url or "embedded",
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.config}: valid: {len(settings.campaigns)} campaign(s) "
            f"({', '.join(campaigns) or 'none'}), "
            f"{len(settings.upstreams)} upstream(s), redis {summary['redis']}"
        )
    return OK


def cmd_openapi(args: argparse.Namespace) -> int:
    from gateway.contract.openapi import document

    print(json.dumps(document(load_settings(args.config)), indent=2))
    return OK


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    configure_logging(args.log_level, settings.logging.format)
    if args.workers is None:
        try:
            args.workers = default_workers()
        except (ValueError, argparse.ArgumentTypeError):
            given = os.environ.get(WORKERS_ENV)
            print(
                f"FLASHGATE_WORKERS must be a whole number of at least 1, got {given!r}",
                file=sys.stderr,
            )
            return INVALID
    if args.workers > 1 and 0 in (
        settings.gateway.port,
        settings.admin.port if settings.admin else 1,
    ):
        print(f"{args.config}: --workers {args.workers} needs fixed ports, not 0", file=sys.stderr)
        return INVALID
    dispatch = not args.no_dispatch
    with redis_for(settings) as url:
        if args.workers == 1:
            from gateway.process.serve import serve_forever

            return serve_forever(settings, url, dispatch=dispatch, config_path=args.config)
        from gateway.process.supervisor import run_workers

        return run_workers(args.config, url, args.workers, args.log_level, dispatch)


def cmd_dispatch(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    configure_logging(args.log_level, settings.logging.format)
    url = _shared_redis(settings, args.config, "dispatch")
    install_uvloop()
    from gateway.process.serve import dispatch_only

    asyncio.run(dispatch_only(settings, url, args.config))
    return OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    from gateway.operations.reconcile import books_json, reconcile, render_books
    from gateway.operations.stores import UnknownCampaign

    settings = load_settings(args.config)
    url = _shared_redis(settings, args.config, "reconcile")
    try:
        books = asyncio.run(
            reconcile(settings, url, only=args.campaign, repair=args.repair, progress=not args.json)
        )
    except UnknownCampaign as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return INVALID
    except StorageError as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return UNAVAILABLE
    print(books_json(books) if args.json else render_books(books, args.config))
    if args.repair:
        return FAILED if books.repair_refused else OK
    return FAILED if books.drift else OK


def cmd_admin(args: argparse.Namespace) -> int:
    from gateway.process.admin_client import run

    return run(args)


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.operations.status import render_status, status

    settings = load_settings(args.config)
    url = _shared_redis(settings, args.config, "status")
    if args.watch:
        from gateway.operations.watch import watch

        try:
            asyncio.run(watch(settings, url, args.interval, args.json))
        except StorageError as exc:
            print(f"flashgate: {exc}", file=sys.stderr)
            return UNAVAILABLE
        return OK
    try:
        rows = asyncio.run(status(settings, url))
    except StorageError as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return UNAVAILABLE
    print(json.dumps({"campaigns": rows}) if args.json else render_status(rows))
    return OK


def _shared_redis(settings: Settings, config: str, command: str) -> str:
    if settings.redis.url is None:
        raise ConfigError(
            config, [("redis.url", f"{command} needs the gateways' Redis, not an embedded one")]
        )
    return settings.redis.url


def default_workers() -> int:
    """$FLASHGATE_WORKERS, else the CPUs this process may run on, capped by a cgroup (v2)
    CPU quota: a container limited to 2 CPUs on a 64-core host gets 2 workers."""
    given = os.environ.get(WORKERS_ENV)
    if given:
        return _positive_int(given)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus or 1, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus or 1)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _add_bench(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--requests",
        type=_positive_int,
        default=20_000,
        help="requests of the oversubscribed sale (default 20000)",
    )
    bench.add_argument(
        "--seconds",
        "--duration",
        dest="seconds",
        type=_positive_float,
        default=3.0,
        help="length of each timed run, seconds (default 3)",
    )
    bench.add_argument(
        "--concurrency", type=_positive_int, default=256, help="connections (default 256)"
    )
    bench.add_argument(
        "--buyers",
        type=_positive_int,
        help="distinct buyers the crowd draws from (default: one per request, at least 1e6)",
    )
    bench.add_argument(
        "--keyed-share",
        type=_share,
        default=1.0,
        help="share of requests with an Idempotency-Key of their own, in every run and "
        "with either generator (default 1: every request, as real clients send)",
    )
    bench.add_argument(
        "--stock",
        type=_positive_int,
        help="stock of the oversubscribed sale (default: 1%% of --requests)",
    )
    bench.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only these (repeatable; default: all)",
    )
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="runs of each comparison, alternating its systems (default 3)",
    )
    bench.add_argument(
        "--generator",
        choices=("auto", "crowd", "wrk"),
        default="auto",
        help="load generator of the throughput-only runs (sold-out, workers, access log): "
        "the built-in crowd, or wrk (C, cheaper per request); auto: wrk when on PATH",
    )
    bench.add_argument(
        "--latency-rate",
        type=_positive_float,
        default=1000.0,
        help="the latency target's fixed rate, winners/s (default 1000); half and a tenth "
        "of the saturated rate are measured too",
    )
    bench.add_argument(
        "--redis",
        type=_redis_url,
        metavar="URL",
        help="run on this Redis (redis://, redis+sentinel://, redis+cluster://) instead of "
        "an embedded one; its database must be empty, and is flushed between runs",
    )
    bench.add_argument(
        "--idle-campaigns",
        type=_counts,
        default=(1, 100, 1000),
        metavar="N,N,...",
        help="catalogue sizes of the idle scenario (default 1,100,1000)",
    )
    bench.add_argument(
        "--idle-settle",
        type=_positive_float,
        default=5.0,
        help="idle scenario: seconds after start before measuring (default 5)",
    )
    bench.add_argument(
        "--idle-window",
        type=_positive_float,
        default=10.0,
        help="idle scenario: seconds measured (default 10)",
    )
    bench.add_argument("--url", help="crowd a running gateway at this purchase URL instead")
    bench.add_argument("--json", action="store_true", help="machine-readable report")
    bench.set_defaults(command=cmd_bench)


def _share(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be a share from 0 to 1")
    return number


def _counts(value: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in value.split(","))


def _redis_url(value: str) -> str:
    from gateway.config.redis_url import parse_redis_url
    from gateway.config.schema import Invalid

    try:
        parse_redis_url(value)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def cmd_bench(args: argparse.Namespace) -> int:
    from gateway.bench.harness import Options, bench, bench_url
    from gateway.bench.report import render

    options = Options(
        requests=args.requests,
        seconds=args.seconds,
        concurrency=args.concurrency,
        buyers=args.buyers,
        stock=args.stock,
        rounds=args.rounds,
        scenarios=tuple(args.scenario or SCENARIOS),
        generator=args.generator,
        keyed_share=args.keyed_share,
        latency_rate=args.latency_rate,
        redis_url=args.redis,
        idle_campaigns=args.idle_campaigns,
        idle_settle=args.idle_settle,
        idle_window=args.idle_window,
        progress=not args.json,
    )
    install_uvloop()
    try:
        report = asyncio.run(bench_url(args.url, options) if args.url else bench(options))
    except RuntimeError as exc:  # a system that did not start, a Redis it cannot use
        print(f"flashgate bench: {exc}", file=sys.stderr)
        return UNAVAILABLE
    print(json.dumps(report) if args.json else render(report))
    correct = all(
        run["verdict"]["correct"]
        for runs in report["runs"].values()
        for run in runs.values()
        if run.get("verdict")
    )
    return OK if correct else FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.process.demo import print_report, run_demo
    from gateway.process.demo_failover import run_failover_demo

    install_uvloop()
    sale = run_demo if args.redis == "embedded" else run_failover_demo
    report = asyncio.run(sale(args))
    print_report(report, args.json)
    return OK if report["verdict"]["correct"] else FAILED


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """The configured Redis URL, or an embedded redis-server for as long as needed."""
    if settings.redis.url is not None:
        yield settings.redis.url
        return
    with EmbeddedRedis() as embedded:
        log.info("embedded redis-server (pid %s) at %s", embedded.pid, embedded.url)
        yield embedded.url


if __name__ == "__main__":
    sys.exit(main())
