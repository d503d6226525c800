"""The ``shards`` scenario: one hot campaign beyond one Redis core (issue 15, item 7).

It runs on a Redis Cluster: ``--redis`` when that is one (``redis+cluster://``),
else a loopback cluster of three primaries the bench starts for it. Two parts:

* **Through flashgate**: the oversubscribed sale (the other scenarios' crowd: keyed
  requests from a population of distinct users) on a campaign with ``shards: 1``
  and with ``shards: 6``, each sale's books checked per shard and in total
  (measure.py). From INFO commandstats on every primary, read before and after each
  run, the script time of each node (the usec of EVALSHA, EVAL and FCALL): with six
  shards on three primaries the busiest node should take about a third of it, with
  one shard it takes all. The readings span the whole run, so they include what the
  gateway does in the background meanwhile (its heartbeat, sweeps, stock moves
  between shards), a small part beside a sale's decisions.
* **The Redis side, without a gateway**: on a machine of two cores the gateway and
  not Redis is the limit, so reserve.lua (its real text, as flashgate sends it to a
  cluster) is called directly by one driver process per node (script_driver.py):
  first on one shard on one node, then on the six shards on every primary at once.
  Reported: decisions a second of each and their ratio, and the script-time bound,
  the cluster run's total script time over its busiest node's: what the cluster
  takes against one node when every node has a core of its own. Where the CPUs are
  fewer than the processes (a node and its driver each), the decisions' ratio is
  what the CPUs allow, and the bound is the figure; the targets say which applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

from gateway.bench.crowd import Tally
from gateway.bench.datastore import Datastore, cluster, owners
from gateway.bench.measure import Run, sharded_books
from gateway.bench.options import Options
from gateway.bench.script_driver import Job
from gateway.bench.systems import CAMPAIGN, PATH, Served, System, flashgate
from gateway.config.redis_url import parse_redis_url
from gateway.edge.buyer import fingerprint
from gateway.forwarding.upstream import OutboundRequest
from limiter.keys import CampaignKeys, shard_keys
from limiter.scripts import Script, Scripts, script, sharded

SALE = "shards: flashgate"
REDIS_SIDE = "shards: Redis side"
#: The sharded campaign's shards: two on each of three primaries.
SHARDS = 6
#: The sale's systems, by name: shards 1 is the baseline.
SALES = {"shards=1": 1, f"shards={SHARDS}": SHARDS}
ONE_NODE, CLUSTER = "one node", "cluster"
GENERATOR = "reserve.lua driver"
#: Commands whose usec is script time.
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
#: Key prefix of the bench's gateways (flashgate's default).
PREFIX = "fg"
#: The Redis side: stock that never runs out, and flashgate's defaults for the rest
#: (per-user limit 1, forward_deadline 30 s, ledger.max_length 100,000, sync mode).
DRIVER_STOCK = 10**12
POLICY: tuple[str | int, ...] = (1, 30_000, 100_000, "sync")
#: Seconds a driver may take to start (a Python process, on a busy machine).
DRIVER_START = 60.0

#: One run of a system (as scenarios.py's Load).
Load = Callable[[str, System, Served], Awaitable[Run]]


@dataclass
class ShardRun(Run):
    """A run with each primary's script time; a Redis-side run's drivers' CPU too."""

    #: usec of script commands on each primary (host:port) over the run: wall time
    #: inside the scripts, a node's time descheduled mid-script included.
    script_usec: dict[str, int] = field(default_factory=dict)
    #: CPU seconds of each primary's redis-server over the run (INFO cpu).
    redis_cpu: dict[str, float] = field(default_factory=dict)
    #: The campaign's shards on each primary.
    shards_by_node: dict[str, int] = field(default_factory=dict)
    #: A Redis-side run: the driver processes' own CPU seconds.
    driver_cpu_seconds: float | None = None

    @classmethod
    def of(cls, run: Run, **figures: Any) -> ShardRun:
        return cls(**{f.name: getattr(run, f.name) for f in fields(Run)}, **figures)

    @property
    def busiest_share(self) -> float | None:
        """The busiest primary's share of the script time."""
        total = sum(self.script_usec.values())
        return max(self.script_usec.values()) / total if total else None

    @property
    def capacity(self) -> float | None:
        """Total script time over the busiest node's: the script-time bound."""
        share = self.busiest_share
        return 1 / share if share else None

    def summary(self) -> dict[str, Any]:
        summary = super().summary()
        total = sum(self.script_usec.values())
        summary.update(
            script_usec_by_node=self.script_usec,
            script_share_by_node={
                node: round(usec / total, 4) if total else None
                for node, usec in self.script_usec.items()
            },
            busiest_node_script_share=_rounded(self.busiest_share),
            script_time_capacity=_rounded(self.capacity),
            shards_by_node=self.shards_by_node,
            redis_cpu_seconds_by_node={n: round(s, 3) for n, s in self.redis_cpu.items()},
        )
        if self.driver_cpu_seconds is not None:
            calls, cpu = max(self.tally.sent, 1), sum(self.redis_cpu.values())
            summary["driver_cpu_us_per_call"] = round(self.driver_cpu_seconds / calls * 1e6, 2)
            summary["redis_cpu_us_per_call"] = round(cpu / calls * 1e6, 2)
            # below the nodes driven: they did not each have a core
            summary["redis_cores_used"] = round(cpu / max(self.tally.elapsed, 1e-9), 3)
            for quantile in ("p50_ms", "p90_ms", "p99_ms"):
                summary[quantile] = None  # pipelined calls: no latency of their own
        return summary


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


@contextlib.asynccontextmanager
async def clustered(options: Options, store: Datastore) -> AsyncIterator[Datastore]:
    """--redis when it is a cluster, else a cluster of the bench's own."""
    if options.redis_url and parse_redis_url(options.redis_url).kind == "cluster":
        yield store
        return
    async with cluster(CAMPAIGN) as own:
        if options.redis_url:
            own.description += " (--redis is not a cluster)"
        yield own


# ------------------------------------------------------------------ through flashgate


def sharded_flashgate(store: Datastore, backend: str, stock: int, shards: int) -> System:
    """flashgate selling the bench campaign with ``shards`` shards, its books checked
    on each shard's node."""
    start = functools.partial(flashgate, store.url, backend, stock, shards=shards)

    async def check(tally: Tally, sells_out: bool) -> dict[str, Any]:
        keys = shard_keys(CAMPAIGN, PREFIX, shards)
        nodes = await owners(store.url, [k.state for k in keys])
        states = [(store.client(node), k.state) for node, k in zip(nodes, keys, strict=True)]
        return await sharded_books(
            states, backend, tally, stock=stock, per_user_limit=1, sells_out=sells_out
        )

    return System(start, check)


async def by_node(store: Datastore, load: Load) -> Load:
    """``load``, with each primary's script time over it and where the shards are."""
    placements = {name: await placement(store, shards) for name, shards in SALES.items()}

    async def measured(name: str, system: System, served: Served) -> Run:
        before = await node_work(store)
        run = await load(name, system, served)
        usec, cpu = since(before, await node_work(store))
        held = placements.get(name, {})
        return ShardRun.of(run, script_usec=usec, redis_cpu=cpu, shards_by_node=held)

    return measured


async def placement(store: Datastore, shards: int) -> dict[str, int]:
    """How many of the campaign's shards each primary holds."""
    keys = [k.state for k in shard_keys(CAMPAIGN, PREFIX, shards)]
    held = Counter(node_name(node) for node in await owners(store.url, keys))
    return {node_name(node): held[node_name(node)] for node in store.primaries}


#: Per primary (host:port): script usec and CPU seconds so far.
Work = dict[str, tuple[int, float]]


async def node_work(store: Datastore) -> Work:
    """Each primary's script usec (INFO commandstats) and CPU seconds (INFO cpu) so far."""
    work = {}
    for node in store.primaries:
        info: dict[str, Any] = await store.client(node).info("commandstats", "cpu")
        usec = sum(int(info.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in SCRIPT_COMMANDS)
        work[node_name(node)] = (usec, float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return work


def since(before: Work, after: Work) -> tuple[dict[str, int], dict[str, float]]:
    """What each primary did between two readings: script usec, CPU seconds."""
    usec = {node: after[node][0] - before[node][0] for node in after}
    cpu = {node: after[node][1] - before[node][1] for node in after}
    return usec, cpu


def node_name(url: str) -> str:
    """host:port of a node's URL (never its password)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


# ------------------------------------------------------------------ the Redis side

#: node URL -> the shards driven there
Plan = dict[str, list[CampaignKeys]]


async def redis_side(
    options: Options,
    store: Datastore,
    runs: dict[str, dict[str, list[Run]]],
    fresh: Callable[[], Awaitable[None]],
) -> None:
    """One shard on one node, then every shard on every primary at once, round after
    round, each from a flushed cluster."""
    keys = shard_keys(CAMPAIGN, PREFIX, SHARDS)
    nodes = await owners(store.url, [k.state for k in keys])
    every: Plan = {}
    for node, shard in zip(nodes, keys, strict=True):
        every.setdefault(node, []).append(shard)
    plans = {ONE_NODE: {nodes[0]: [keys[0]]}, CLUSTER: every}
    reserve = sharded(Scripts.read().reserve)  # as flashgate calls it on a cluster
    systems = runs.setdefault(REDIS_SIDE, {})
    for _ in range(options.rounds):
        for name, plan in plans.items():
            await fresh()
            await seed(store, plan, reserve)
            run = await drive_nodes(name, store, plan, reserve, options.seconds)
            systems.setdefault(name, []).append(run)


async def seed(store: Datastore, plan: Plan, reserve: Script) -> None:
    """Each shard's counters (init_campaign.lua), and reserve.lua loaded on each node."""
    init = script("init_campaign").text
    for node, shards in plan.items():
        client = store.client(node)
        for keys in shards:
            args = (DRIVER_STOCK, "bench", POLICY[2], SHARDS)
            await client.eval(init, 2, keys.state, keys.ledger, *args)
        if await client.script_load(reserve.text) != reserve.sha:
            raise RuntimeError(f"{node_name(node)} loaded reserve.lua under another SHA1")


def jobs(plan: Plan, reserve: Script, seconds: float) -> list[Job]:
    payload, asked = order()
    return [
        Job(
            node=node,
            worker=worker,
            campaign=CAMPAIGN,
            sha=reserve.sha,
            shards=[driven(k) for k in shards],
            policy=POLICY,
            payload=payload,
            fingerprint=asked,
            seconds=seconds,
        )
        for worker, (node, shards) in enumerate(plan.items())
    ]


def driven(k: CampaignKeys) -> list[str]:
    """A shard as a driver calls it: reserve.lua's six keys, the prefix of its records'
    keys (a reservation id's token follows), its events channel."""
    reserve_keys = [k.state, k.users, k.idempotency, k.ledger, k.index, k.deadlines]
    return [*reserve_keys, k.reservation(f"{CAMPAIGN}."), k.events]


def order() -> tuple[str, str]:
    """An order the size of the one flashgate keeps for a bench buyer, and the
    fingerprint of the bench's request."""
    headers = CIMultiDict(
        {
            "Host": "127.0.0.1:8080",
            "Idempotency-Key": '"req-123456"',
            "Content-Length": "0",
            "X-Reservation-Id": f"{CAMPAIGN}.{'0' * 20}",
            "X-Campaign-Id": CAMPAIGN,
            "X-User-Id": "buyer-123456",
            "X-Quantity": "1",
            "X-Delivery-Attempt": "1",
            "Via": "1.1 flashgate",
            "X-Forwarded-For": "127.0.0.1",
            "X-Real-IP": "127.0.0.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "127.0.0.1:8080",
            "Forwarded": 'for=127.0.0.1;host="127.0.0.1:8080";proto=http',
        }
    )
    payload = OutboundRequest("POST", PATH, headers, b"").encode().decode()
    return payload, fingerprint(f"POST {PATH}", 1, b"")


async def drive_nodes(
    name: str, store: Datastore, plan: Plan, reserve: Script, seconds: float
) -> ShardRun:
    """Every node of ``plan`` driven at once for ``seconds``, by a process of its own."""
    with tempfile.TemporaryFile(prefix="flashgate-bench-driver-") as log:
        async with drivers(jobs(plan, reserve, seconds), log) as children:
            for child in children:
                await _line(child, DRIVER_START, log)  # "ready"
            work, commands = await node_work(store), await store.commands()
            for child in children:
                assert child.stdin is not None
                child.stdin.write(b"go\n")
            results = [json.loads(await _line(c, seconds + DRIVER_START, log)) for c in children]
            usec, cpu = since(work, await node_work(store))
            commands = await store.commands() - commands
    statuses: Counter[str] = Counter()
    for result in results:
        statuses.update(result["statuses"])
    calls = sum(statuses.values())
    tally = Tally(outcomes=statuses, sent=calls, elapsed=max(r["seconds"] for r in results))
    tally.buyers = tally.issued = tally.keyed = tally.distinct_users = calls
    checks = {
        "every_call_reserved": statuses["reserved"] == calls > 0,
        "redis_ran_every_call": commands["evalsha"] == calls,
        "counters_agree": await reserved(store, plan) == calls,
    }
    verdict = {"correct": all(checks.values()), **checks, "calls": calls, "nodes_driven": len(plan)}
    run = Run(name, tally, commands, f"{GENERATOR} x {len(plan)}", verdict=verdict)
    run.redis = store.description
    return ShardRun.of(
        run,
        script_usec=usec,
        redis_cpu=cpu,
        shards_by_node={node_name(n): len(plan.get(n, [])) for n in store.primaries},
        driver_cpu_seconds=sum(r["cpu_seconds"] for r in results),
    )


async def reserved(store: Datastore, plan: Plan) -> int:
    """Units reserved, by the counters of every shard driven."""
    units = 0
    for node, shards in plan.items():
        for keys in shards:
            units += int(await store.client(node).hget(keys.state, "reserved") or 0)
    return units


@contextlib.asynccontextmanager
async def drivers(
    work: Sequence[Job], log: IO[bytes]
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """A driver process per job, told its job; each is stopped (by its pid) on the way
    out if it has not finished."""
    children: list[asyncio.subprocess.Process] = []
    try:
        for job in work:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.bench.script_driver",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
            children.append(child)
            assert child.stdin is not None
            child.stdin.write(json.dumps(asdict(job)).encode() + b"\n")
        yield children
    finally:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
            await child.wait()


async def _line(child: asyncio.subprocess.Process, within: float, log: IO[bytes]) -> str:
    """The driver's next line; an error with what it said on stderr when it has none."""
    assert child.stdout is not None
    with contextlib.suppress(TimeoutError):
        line = await asyncio.wait_for(child.stdout.readline(), within)
        if line:
            return line.decode()
    log.seek(0)
    said = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"a reserve.lua driver (pid {child.pid}) stopped: {said}")
