"""``flashgate demo --redis sentinel|cluster``: the demo sale on a Redis topology of
its own, with the campaign's primary killed (SIGKILL) a third of the way in.

The crowd is paced (``--rate``), so that the sale lasts through the failover:
buyers get fail-closed 503s while there is no primary, and win again once the
gateway has found the promoted replica, with no restart. Every sale waits for one
replica (``redis.wait_for_replicas: 1``), and the report counts the buyers told
201 whose sale the promoted primary does not have: the acknowledged sales lost.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from gateway.bench.backend import StubBackend, serve_backend
from gateway.bench.crowd import Crowd, Tally, run_crowd
from gateway.config import parse_settings
from gateway.core.runtime import Runtime
from gateway.edge.server import create_server
from gateway.embedded.topology import ClusterTopology, SentinelTopology
from gateway.operations.terminal import Progress
from gateway.process.demo import CAMPAIGN, config, report, verdict
from gateway.process.serve import edge_parts
from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.records import Figures, State
from limiter.store import CampaignStore

#: Each paced burst of the crowd lasts this long; the demo looks around between them.
BURST_SECONDS = 0.25
#: The whole sale stops after this long, sold out or not.
SALE_SECONDS = 60.0


@dataclass
class Failover:
    killed: str = ""
    promoted: str = ""
    sold_before: int = 0
    started: float = 0.0
    seconds: float = 0.0


async def run_failover_demo(args: argparse.Namespace) -> dict[str, Any]:
    topology: SentinelTopology | ClusterTopology = (
        SentinelTopology() if args.redis == "sentinel" else ClusterTopology()
    )
    backend = StubBackend(latency=(0.001, 0.005))
    with topology:
        async with serve_backend(backend) as backend_url:
            data = config(args, backend_url)
            data["redis"] = {
                "url": topology.url,
                "timeout": "1s",
                "wait_for_replicas": 1,
                "replica_timeout": "200ms",
            }
            settings = parse_settings(yaml.safe_dump(data), "<demo>")
            async with Runtime.open(settings, topology.url) as runtime:
                runner = web.ServerRunner(create_server(edge_parts(runtime)))
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
                store = runtime.snapshot.campaigns[CAMPAIGN].store
                tally, failover = await _sale(args, runner.addresses[0][1], store, topology)
                figures = await _settled(store)
                lost = await _lost(store, tally)
                await runner.cleanup()
    result = report(args, tally, verdict(args, figures, backend, lost))
    result["failover"] = {
        "killed": failover.killed,
        "promoted": failover.promoted,
        "sold_before": failover.sold_before,
        "seconds": round(failover.seconds, 2),
        "unavailable": tally.outcomes.get("unavailable", 0),
    }
    return result


async def _sale(
    args: argparse.Namespace,
    port: int,
    store: CampaignStore,
    topology: SentinelTopology | ClusterTopology,
) -> tuple[Tally, Failover]:
    tally, failover = Tally(), Failover()
    promoted: asyncio.Future[int] | None = None
    progress = Progress(args.stock, "sold", enabled=not args.json)
    ends = time.monotonic() + SALE_SECONDS
    burst = 0
    while time.monotonic() < ends:
        part = await run_crowd(_burst(args, port, burst))
        burst += 1
        _merge(tally, part)
        progress.advance(len(part.wins))
        if promoted is None and len(tally.wins) * 3 >= args.stock:
            failover.sold_before = len(tally.wins)
            promoted = _kill(topology, failover)
        if promoted is not None and promoted.done() and not failover.promoted:
            failover.promoted = f"127.0.0.1:{promoted.result()}"
            failover.seconds = time.monotonic() - failover.started
        if failover.promoted and await _sold_out(store):
            break
    progress.close()
    return tally, failover


def _burst(args: argparse.Namespace, port: int, burst: int) -> Crowd:
    return Crowd(
        host="127.0.0.1",
        port=port,
        path=f"/seckill/{CAMPAIGN}",
        buyers=args.buyers,
        duration=BURST_SECONDS,
        rate=args.rate,
        concurrency=min(args.concurrency, 16),
        max_quantity=1,
        retry_share=0.05,
        seed=burst,
    )


def _kill(topology: SentinelTopology | ClusterTopology, failover: Failover) -> asyncio.Future[int]:
    """SIGKILL the campaign's primary; the future gets the port of the replica that the
    sentinels (or the cluster) promote."""
    if isinstance(topology, SentinelTopology):
        port = topology.kill_primary()
        wait: Callable[[int], int] = topology.wait_for_failover
    else:
        port = topology.primary_for_key(CampaignKeys(CAMPAIGN).state)
        topology.kill(port)
        wait = topology.wait_for_failover
    failover.killed = f"127.0.0.1:{port}"
    failover.started = time.monotonic()
    return asyncio.ensure_future(asyncio.to_thread(wait, port))


def _merge(tally: Tally, part: Tally) -> None:
    tally.outcomes.update(part.outcomes)
    for outcome, latencies in part.latencies.items():
        tally.latencies.setdefault(outcome, []).extend(latencies)
    tally.wins.update(part.wins)
    tally.sent += part.sent
    tally.elapsed += part.elapsed


async def _sold_out(store: CampaignStore) -> bool:
    try:
        return (await store.figures()).available == 0
    except StorageError:
        return False


async def _settled(store: CampaignStore, within: float = 30.0) -> Figures:
    """The counters once nothing is in flight (a commit retried through the failover
    has landed), or as they are at the deadline."""
    ends = time.monotonic() + within
    while True:
        try:
            figures = await store.figures()
        except StorageError:
            figures = None
        if figures is not None and (figures.reserved == 0 or time.monotonic() > ends):
            return figures
        await asyncio.sleep(0.1)


async def _lost(store: CampaignStore, tally: Tally) -> int:
    """Buyers told 201 whose reservation is not a sale in Redis now."""
    records = await asyncio.gather(*(store.reservation(rid) for rid in tally.wins))
    return sum(1 for r in records if r is None or r.state is not State.COMMITTED)
