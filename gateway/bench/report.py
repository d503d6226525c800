"""How ``flashgate bench`` prints its report for people (``--json`` for machines)."""

from __future__ import annotations

from typing import Any

from gateway.operations.terminal import table

RUN_COLUMNS = [
    "scenario",
    "system",
    "requests",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "redis cmds/req*",
    "net*",
    "scripts/winner",
    "trips/winner",
    "correct",
]


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"flashgate bench on {m['cpus']} CPU(s), {m['cpu']}, Python {m['python']}"]
    lines.append(f"redis: {report['options'].get('redis', 'embedded')}")
    if report["runs"]:
        details = _details(report["runs"], report["options"].get("redis", ""))
        lines += ["", table(RUN_COLUMNS, _run_rows(report["runs"])), *details]
        lines.append(
            "  * commands Redis ran per request, inside scripts too (INFO commandstats); "
            "net: beyond the background rate measured with the system up and nobody buying"
        )
    if report.get("idle"):
        lines += ["", *_idle(report["idle"])]
    if report["targets"]:
        rows = [(t["target"], t["goal"], t["measured"], t["met"]) for t in report["targets"]]
        lines += ["", table(["target", "goal", "measured", "met"], rows)]
    return "\n".join(lines)


def _run_rows(runs: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (
            group,
            name,
            run["requests"],
            run["requests_per_second"],
            run["p50_ms"],
            run["p90_ms"],
            run["p99_ms"],
            run["redis_commands_per_request"],
            run.get("redis_commands_per_request_net"),
            run.get("script_calls_per_winner"),
            run.get("redis_round_trips_per_winner"),
            _verdict(run.get("verdict")),
        )
        for group, systems in runs.items()
        for name, run in systems.items()
    ]


def _details(runs: dict[str, Any], redis: str) -> list[str]:
    """What each crowd sent and what it got (and where, when not on the usual Redis)."""
    lines = []
    for group, systems in runs.items():
        for name, run in systems.items():
            outcomes = ", ".join(
                f"{code} {o['count']:,}" + (f" (p99 {o['p99_ms']} ms)" if "p99_ms" in o else "")
                for code, o in run["outcomes"].items()
            )
            sent = run.get("sent") or {}
            what = (
                f"{sent.get('keyed', 0):,} of {sent.get('issued', 0):,} sent keyed, "
                f"{sent.get('distinct_users', 0):,} users of {sent.get('buyers', 0):,}"
            )
            lines.append(
                f"  {group} / {name} ({run.get('generator', 'crowd')}; {what}): {outcomes}"
            )
            if run.get("script_share_by_node"):
                lines.append(f"    {_by_node(run)}")
    return lines


def _by_node(run: dict[str, Any]) -> str:
    """Where a shards run's script time went, and where its shards are."""
    held = run.get("shards_by_node", {})
    nodes = ", ".join(
        f"{node} {share:.1%} ({held.get(node, 0)} shard{'' if held.get(node) == 1 else 's'})"
        for node, share in run["script_share_by_node"].items()
        if share is not None
    )
    return f"script time by primary: {nodes}"


def _idle(idle: dict[str, Any]) -> list[str]:
    rows = [
        (
            g["campaigns"],
            g["workers"],
            g["redis_commands_per_second"],
            g["redis_commands_per_second_net"],
            ", ".join(f"{p['role']} {p['cpu_percent_of_a_core']}" for p in g["processes"]),
        )
        for g in idle["gateways"]
    ]
    return [
        f"idle: {idle['window_seconds']:g} s measured after {idle['settle_seconds']:g} s; "
        f"Redis alone ran {idle['redis_background_commands_per_second']} commands/s",
        table(["campaigns", "workers", "redis cmds/s", "net", "CPU % of a core"], rows),
    ]


def _verdict(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "-"
    if verdict["correct"]:
        return "yes"
    return "NO: " + ", ".join(k for k, v in verdict.items() if v is False)
