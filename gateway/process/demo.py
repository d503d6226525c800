"""``flashgate demo``: a whole flash sale on this machine, then a report.

An embedded Redis, the built-in order backend, a gateway, and a burst of
simulated buyers (some of them retrying with an Idempotency-Key). The report
says what was sold, why everyone else was refused, and whether the books
balance: nothing oversold, nobody above the limit, the backend saw exactly the
winners.

``--redis sentinel`` or ``--redis cluster`` runs the sale on a Redis Sentinel or
Cluster topology of its own instead, and kills the campaign's primary with SIGKILL
a third of the way in (see demo_failover.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

import yaml
from aiohttp import web

from gateway.bench.backend import StubBackend, serve_backend
from gateway.bench.crowd import Crowd, Tally, percentile, run_crowd
from gateway.config import parse_settings
from gateway.core.runtime import Runtime
from gateway.edge.server import create_server
from gateway.embedded.server import EmbeddedRedis
from gateway.operations.terminal import Progress, table
from gateway.process.serve import edge_parts
from limiter.records import Figures

CAMPAIGN = "demo-phone"


@dataclass(frozen=True)
class SaleVerdict:
    stock_total: int
    available: int
    reserved: int
    sold: int
    backend_orders: int
    backend_units: int
    oversold: int
    over_limit_users: int
    duplicate_deliveries: int
    #: Buyers told 201 whose sale Redis does not have (a failover lost it).
    acknowledged_lost: int = 0

    @property
    def correct(self) -> bool:
        return (
            self.oversold == 0
            and self.over_limit_users == 0
            and self.duplicate_deliveries == 0
            and self.acknowledged_lost == 0
            and self.stock_total == self.available + self.reserved + self.sold
            and self.backend_units == self.sold
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stock", type=int, default=100, help="items on sale (default 100)")
    parser.add_argument("--buyers", type=int, default=2000, help="distinct buyers (default 2000)")
    parser.add_argument(
        "--requests", type=int, default=5000, help="purchase requests (default 5000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=256, help="requests in flight (default 256)"
    )
    parser.add_argument("--per-user-limit", type=int, default=1, help="units per buyer (default 1)")
    parser.add_argument(
        "--redis",
        choices=("embedded", "sentinel", "cluster"),
        default="embedded",
        help="embedded: one private redis-server; sentinel or cluster: a topology of its "
        "own on loopback, whose primary is killed in the middle of the sale",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=60.0,
        help="with --redis sentinel|cluster: purchase requests per second (default 60)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable report")


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    backend = StubBackend(latency=(0.001, 0.005))
    with EmbeddedRedis() as redis:
        async with serve_backend(backend) as backend_url:
            settings = parse_settings(yaml.safe_dump(config(args, backend_url)), "<demo>")
            async with Runtime.open(settings, redis.url) as runtime:
                runner = web.ServerRunner(create_server(edge_parts(runtime)))
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
                port = runner.addresses[0][1]
                crowd = Crowd(
                    host="127.0.0.1",
                    port=port,
                    path=f"/seckill/{CAMPAIGN}",
                    buyers=args.buyers,
                    requests=args.requests,
                    concurrency=args.concurrency,
                    max_quantity=1,
                    retry_share=0.05,
                )
                progress = Progress(args.requests, "buyers", enabled=not args.json)
                tally = await run_crowd(crowd, on_answer=progress.advance)
                progress.close()
                figures = await runtime.snapshot.campaigns[CAMPAIGN].store.figures()
                await runner.cleanup()
    return report(args, tally, verdict(args, figures, backend))


def verdict(
    args: argparse.Namespace, figures: Figures, backend: StubBackend, acknowledged_lost: int = 0
) -> SaleVerdict:
    units = sum(u for _, u in backend.orders.values())
    return SaleVerdict(
        stock_total=figures.stock_total,
        available=figures.available,
        reserved=figures.reserved,
        sold=figures.sold,
        backend_orders=len(backend.orders),
        backend_units=units,
        oversold=max(0, units - figures.stock_total),
        over_limit_users=sum(
            1 for u in backend.units_by_user().values() if u > args.per_user_limit
        ),
        duplicate_deliveries=backend.duplicates,
        acknowledged_lost=acknowledged_lost,
    )


def config(args: argparse.Namespace, backend_url: str) -> dict[str, Any]:
    return {
        "gateway": {"host": "127.0.0.1", "port": 0},
        "access_log": {"enabled": False},  # the report is what the demo shows
        "upstreams": {"shop": {"url": backend_url, "timeout": 2.0}},
        "campaigns": [
            {
                "id": CAMPAIGN,
                "route": f"POST /seckill/{CAMPAIGN}",
                "upstream": "shop",
                "stock": args.stock,
                "per_user_limit": args.per_user_limit,
                "max_quantity": 1,
            }
        ],
    }


def report(args: argparse.Namespace, tally: Tally, verdict: SaleVerdict) -> dict[str, Any]:
    return {
        "requests": tally.sent,
        "buyers": args.buyers,
        "seconds": round(tally.elapsed, 3),
        "requests_per_second": round(tally.rate, 1),
        "outcomes": dict(tally.outcomes.most_common()),
        "p99_ms": {k: round(percentile(v, 0.99) * 1000, 2) for k, v in tally.latencies.items()},
        "verdict": {**asdict(verdict), "correct": verdict.correct},
        "redis": getattr(args, "redis", "embedded"),
    }


def render(report: dict[str, Any]) -> str:
    v = report["verdict"]
    rows = [
        (outcome, count, report["p99_ms"][outcome]) for outcome, count in report["outcomes"].items()
    ]
    lines = [
        f"flashgate demo: {report['requests']:,} requests from {report['buyers']:,} buyers "
        f"for {v['stock_total']:,} items in {report['seconds']:.2f}s "
        f"({report['requests_per_second']:,.0f} req/s)",
        "",
        table(["outcome", "requests", "p99 ms"], rows),
        "",
        table(
            [
                "stock_total",
                "available",
                "reserved",
                "sold",
                "backend orders",
                "oversold",
                "over limit",
            ],
            [
                (
                    v["stock_total"],
                    v["available"],
                    v["reserved"],
                    v["sold"],
                    v["backend_orders"],
                    v["oversold"],
                    v["over_limit_users"],
                )
            ],
        ),
        *_failover_lines(report),
        "",
        "verdict: "
        + (
            "correct: sold exactly the stock, nobody above the limit, "
            "the backend saw exactly the winners"
            + (", no acknowledged sale lost" if "failover" in report else "")
            if v["correct"]
            else "INCORRECT"
        ),
    ]
    return "\n".join(lines)


def _failover_lines(report: dict[str, Any]) -> list[str]:
    failover = report.get("failover")
    if failover is None:
        return []
    return [
        "",
        f"redis {report['redis']}: primary {failover['killed']} killed (SIGKILL) after "
        f"{failover['sold_before']} sales; {failover['promoted']} took over "
        f"{failover['seconds']:.1f}s later. Meanwhile {failover['unavailable']} requests got "
        "503 unavailable (fail closed); acknowledged sales lost: "
        f"{report['verdict']['acknowledged_lost']}",
    ]


def print_report(report: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(report) if as_json else render(report))
