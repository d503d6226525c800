"""The goals of issue 14, each with what this run measured: the ``targets`` table.

Every ratio is the median of round-by-round ratios (each pair of systems ran back
to back, so both saw the same state of a noisy machine); every other figure is the
median over rounds. Rows marked ``met: None`` are information, not goals.
``TARGETS`` lists one function per scenario; a scenario without goals has none.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.bench import waiting_room
from gateway.bench.measure import Run
from gateway.bench.options import Options
from gateway.bench.scenarios import (
    EVERYONE_WINS,
    FIXED_RATE,
    HALF_RATE,
    REPLICAS_EVERYONE,
    REPLICAS_SALE,
    TENTH_RATE,
    Runs,
)
from gateway.bench.shards import CLUSTER, ONE_NODE, REDIS_SIDE, SALE, SHARDS, ShardRun

Row = dict[str, Any]
#: Below this many Redis commands per request (net of the background), none is made
#: per request: one command per request would be 1.0, the background's noise ~1e-4.
NO_COMMANDS = 0.001


@dataclass(frozen=True)
class Results:
    runs: Runs
    idle: dict[str, Any] | None
    options: Options

    def ratio(self, scenario: str, a: str, b: str) -> float | None:
        """The median over rounds of round-by-round throughput ratios a / b."""
        systems = self.runs.get(scenario, {})
        pairs = zip(systems.get(a, []), systems.get(b, []), strict=False)
        ratios = [x.tally.rate / y.tally.rate for x, y in pairs if y.tally.rate]
        return round(statistics.median(ratios), 3) if ratios else None

    def median(
        self, scenario: str, name: str, figure: Callable[[Run], float | None]
    ) -> float | None:
        values = [
            v for r in self.runs.get(scenario, {}).get(name, []) if (v := figure(r)) is not None
        ]
        return round(statistics.median(values), 4) if values else None

    def correct(self, scenario: str) -> bool:
        """Every checked run of the scenario had its books right."""
        rounds = [r for rs in self.runs.get(scenario, {}).values() for r in rs if r.verdict]
        return all(r.verdict is not None and r.verdict["correct"] for r in rounds)


def _row(target: str, goal: str, measured: float | str | None, met: bool | None) -> Row:
    return {"target": target, "goal": goal, "measured": measured, "met": met}


def _at_least(value: float | None, goal: float, *also: bool) -> bool:
    return value is not None and value >= goal and all(also)


def _at_most(value: float | None, goal: float) -> bool:
    return value is not None and value <= goal


def _per_winner(run: Run) -> float | None:
    return run.redis_work()["script_calls_per_winner"]  # type: ignore[no-any-return]


def _trips_per_winner(run: Run) -> float | None:
    return run.redis_work()["redis_round_trips_per_winner"]  # type: ignore[no-any-return]


def sold_out(results: Results) -> list[Row]:
    if "sold-out" not in results.runs:
        return []
    ratio = results.ratio("sold-out", "flashgate", "fixed 409")
    net = results.median("sold-out", "flashgate", Run.net_commands_per_request)
    return [
        _row(
            "a. sold out, keyed: flashgate vs aiohttp web.Server's fixed 409",
            ">= 0.9x",
            ratio,
            _at_least(ratio, 0.9),
        ),
        _row(
            "a. sold out: Redis commands per request, net of the background",
            f"0 (< {NO_COMMANDS})",
            net,
            net is not None and net < NO_COMMANDS,
        ),
        _row(
            "   sold out: flashgate vs an aiohttp Application's hello",
            "-",
            results.ratio("sold-out", "flashgate", "hello"),
            None,
        ),
    ]


def oversubscribed(results: Results) -> list[Row]:
    if "oversubscribed" not in results.runs:
        return []
    ratio = results.ratio("oversubscribed", "flashgate", "deduct-only")
    correct = results.correct("oversubscribed")
    trips_per_decision = results.median(
        "oversubscribed",
        "flashgate",
        lambda r: r.redis_work()["redis_round_trips_per_decision"],
    )
    return [
        _row(
            "b. oversubscribed, keyed: flashgate vs naive deduct-only",
            ">= 4x, both correct",
            ratio,
            _at_least(ratio, 4.0, correct),
        ),
        _row(
            "   oversubscribed: flashgate vs naive full reserve",
            "-",
            results.ratio("oversubscribed", "flashgate", "naive"),
            None,
        ),
        *_per_winner_rows(results, "oversubscribed", "   oversubscribed"),
        _row("   oversubscribed: Redis round trips per decision", "-", trips_per_decision, None),
    ]


def _per_winner_rows(results: Results, scenario: str, label: str) -> list[Row]:
    return [
        _row(
            f"{label}: script calls per winner",
            "-",
            results.median(scenario, "flashgate", _per_winner),
            None,
        ),
        _row(
            f"{label}: Redis round trips per winner",
            "-",
            results.median(scenario, "flashgate", _trips_per_winner),
            None,
        ),
    ]


def everyone_wins(results: Results) -> list[Row]:
    if EVERYONE_WINS not in results.runs:
        return []
    ratio = results.ratio(EVERYONE_WINS, "flashgate", "deduct-only")
    calls = results.median(EVERYONE_WINS, "flashgate", _per_winner)
    correct = results.correct(EVERYONE_WINS)
    per_winner = _per_winner_rows(results, EVERYONE_WINS, "   everyone wins")
    return [
        _row(
            "c. everyone wins, forwarded: flashgate vs naive deduct-only",
            ">= 1.2x, both correct",
            ratio,
            _at_least(ratio, 1.2, correct),
        ),
        _row("c. everyone wins: script calls per winner", "<= 0.3", calls, _at_most(calls, 0.3)),
        per_winner[1],
    ]


def _added_p99(results: Results, scenario: str) -> float | None:
    """Milliseconds flashgate adds to the backend's p99 (medians over the rounds)."""
    mine = results.median(scenario, "flashgate", lambda r: r.tally.quantile(0.99))
    direct = results.median(scenario, "direct", lambda r: r.tally.quantile(0.99))
    return round((mine - direct) * 1000, 3) if mine is not None and direct is not None else None


def latency(results: Results) -> list[Row]:
    if FIXED_RATE not in results.runs:
        return []
    added = _added_p99(results, FIXED_RATE)
    rate = f"{results.options.latency_rate:,g}"
    return [
        _row(
            f"d. p99 added over the backend, paced at {rate} winners/s",
            "<= 2 ms",
            added,
            _at_most(added, 2.0),
        ),
        _row("   the same at half the saturated rate", "-", _added_p99(results, HALF_RATE), None),
        _row("   the same at a tenth of it", "-", _added_p99(results, TENTH_RATE), None),
    ]


def workers(results: Results) -> list[Row]:
    if "workers" not in results.runs:
        return []
    ratio = results.ratio("workers", "workers=2", "workers=1")
    return [_row("e. --workers 2 vs 1, sold out, keyed", ">= 1.7x", ratio, _at_least(ratio, 1.7))]


def access_log(results: Results) -> list[Row]:
    if "access-log" not in results.runs:
        return []
    rate = results.median
    quiet = rate("access-log", "not logging refusals", lambda r: r.tally.rate)
    loud = rate("access-log", "logging every refusal", lambda r: r.tally.rate)
    cost = round((1 / loud - 1 / quiet) * 1e6, 2) if loud and quiet else None
    return [_row("access log: µs per logged request (from throughput)", "measured", cost, True)]


def idle(results: Results) -> list[Row]:
    """At the largest catalogue measured; goals only at 1,000 campaigns or more."""
    if not results.idle or not results.idle["gateways"]:
        return []
    gateways = results.idle["gateways"]
    largest = max(g["campaigns"] for g in gateways)
    rows = []
    for g in (g for g in gateways if g["campaigns"] == largest):
        label = f"idle, {largest:,} campaigns, {g['workers']} worker(s)"
        goal = largest >= 1000
        commands, cpu = g["redis_commands_per_second_net"], g["max_cpu_percent_of_a_core"]
        rows += [
            _row(f"{label}: Redis commands/s", "< 50", commands, commands < 50 if goal else None),
            _row(
                f"{label}: CPU per process, % of a core (most)",
                "< 2",
                cpu,
                (cpu is not None and cpu < 2) if goal else None,
            ),
        ]
    return rows


def replicas(results: Results) -> list[Row]:
    rows = []
    for scenario, what in ((REPLICAS_SALE, "oversubscribed"), (REPLICAS_EVERYONE, "everyone wins")):
        if scenario in results.runs:
            ratio = results.ratio(scenario, "wait_for_replicas=1", "wait_for_replicas=0")
            rows.append(
                _row(
                    f"replicas, {what}: wait_for_replicas 1 vs 0 throughput",
                    "measured, both correct",
                    ratio,
                    results.correct(scenario),
                )
            )
    return rows


def _busiest(run: Run) -> float | None:
    return run.busiest_share if isinstance(run, ShardRun) else None


def _capacity(run: Run) -> float | None:
    return run.capacity if isinstance(run, ShardRun) else None


def shards(results: Results) -> list[Row]:
    """The busiest node's share of script time through flashgate; the Redis side's
    capacity, cluster against one node (by script time, and by decisions a second)."""
    rows = []
    if SALE in results.runs:
        many, one = f"shards={SHARDS}", "shards=1"
        share = results.median(SALE, many, _busiest)
        rows += [
            _row(
                f"shards: busiest node's share of script time, {SHARDS} shards",
                "<= 0.45, both correct",
                share,
                _at_most(share, 0.45) and results.correct(SALE),
            ),
            _row("   the same with one shard", "-", results.median(SALE, one, _busiest), None),
            _row(
                f"   flashgate throughput, {SHARDS} shards vs 1",
                "-",
                results.ratio(SALE, many, one),
                None,
            ),
        ]
    if REDIS_SIDE in results.runs:
        rows += _redis_side(results)
    return rows


def _redis_side(results: Results) -> list[Row]:
    capacity = results.median(REDIS_SIDE, CLUSTER, _capacity)
    decisions = results.ratio(REDIS_SIDE, CLUSTER, ONE_NODE)
    nodes = max(
        (
            sum(1 for n in r.shards_by_node.values() if n)
            for r in results.runs[REDIS_SIDE].get(CLUSTER, [])
            if isinstance(r, ShardRun)
        ),
        default=0,
    )
    cpus = os.cpu_count() or 1
    # a node and its driver each need a core for the decisions' ratio to be the cluster's
    applies = "decisions/s" if cpus >= 2 * nodes else "script time"
    return [
        _row(
            "shards, Redis side: script-time capacity, cluster vs one node",
            ">= 2.5, correct",
            capacity,
            _at_least(capacity, 2.5, results.correct(REDIS_SIDE)),
        ),
        _row("   Redis side: decisions/s, cluster vs one node", "-", decisions, None),
        _row(
            f"   the bound that applies ({cpus} CPUs, {nodes} nodes and {nodes} drivers)",
            "-",
            applies,
            None,
        ),
    ]


TARGETS: list[Callable[[Results], list[Row]]] = [
    sold_out,
    oversubscribed,
    everyone_wins,
    latency,
    workers,
    access_log,
    idle,
    replicas,
    lambda results: waiting_room.targets(results.runs),
    shards,
]


def targets(runs: Runs, idle_figures: dict[str, Any] | None, options: Options) -> list[Row]:
    results = Results(runs, idle_figures, options)
    return [row for table in TARGETS for row in table(results)]
