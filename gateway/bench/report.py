"""How ``flashgate bench`` prints its report for people (``--json`` for machines)."""

from __future__ import annotations

from typing import Any

from gateway.operations.terminal import table


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"flashgate bench on {m['cpus']} CPU(s), {m['cpu']}, Python {m['python']}", ""]
    rows = []
    for group, runs in report["runs"].items():
        for name, run in runs.items():
            rows.append(
                (
                    group,
                    name,
                    run["requests"],
                    run["requests_per_second"],
                    run["p50_ms"],
                    run["p90_ms"],
                    run["p99_ms"],
                    run["redis_commands_per_request"],
                    _verdict(run.get("verdict")),
                )
            )
    lines.append(
        table(
            [
                "scenario",
                "system",
                "requests",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "redis cmds/req",
                "correct",
            ],
            rows,
        )
    )
    for group, runs in report["runs"].items():
        for name, run in runs.items():
            outcomes = ", ".join(
                f"{code} {o['count']:,}" + (f" (p99 {o['p99_ms']} ms)" if "p99_ms" in o else "")
                for code, o in run["outcomes"].items()
            )
            lines.append(f"  {group} / {name} ({run.get('generator', 'crowd')}): {outcomes}")
    lines.append("  * commands Redis ran per request, inside scripts too (INFO commandstats)")
    if report["targets"]:
        lines += [
            "",
            table(
                ["target", "goal", "measured", "met"],
                [(t["target"], t["goal"], t["measured"], t["met"]) for t in report["targets"]],
            ),
        ]
    return "\n".join(lines)


def _verdict(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "-"
    if verdict["correct"]:
        return "yes"
    return "NO: " + ", ".join(k for k, v in verdict.items() if v is False)
