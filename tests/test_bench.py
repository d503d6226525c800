"""A short bench run: the harness works end to end and every sale it runs is correct.
Speed is not asserted here (docs/benchmarks.md has the figures and how to get them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def bench(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--log-level",
            "warning",
            "bench",
            "--json",
            "--rounds",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_oversubscribed_sale_is_correct_for_both_designs() -> None:
    report = bench(
        "--scenario",
        "oversubscribed",
        "--requests",
        "1500",
        "--concurrency",
        "64",
        "--stock",
        "20",
        "--buyers",
        "1000",
    )
    runs = report["runs"]["oversubscribed"]
    for name in ("naive", "flashgate"):
        verdict = runs[name]["verdict"]
        assert verdict["correct"] is True, (name, verdict)
        assert (verdict["stock_total"], verdict["sold"], verdict["oversold"]) == (20, 20, 0)
        assert runs[name]["requests"] == 1500
        assert sum(o["count"] for o in runs[name]["outcomes"].values()) == 1500
    assert runs["flashgate"]["decided"] >= 20
    assert runs["flashgate"]["redis_round_trips_per_decision"] is not None
    targets = {t["target"][:2] for t in report["targets"]}
    assert targets == {"a.", "c."}


def test_sold_out_path_makes_no_redis_calls_per_request() -> None:
    report = bench(
        "--scenario", "sold-out", "--duration", "1", "--concurrency", "32", "--generator", "crowd"
    )
    flashgate = report["runs"]["sold-out"]["flashgate"]
    assert set(flashgate["outcomes"]) == {"sold-out"}
    # only the background work of a second (polls, heartbeat, sweeps): not one per request
    assert flashgate["redis_commands_per_request"] < 0.05
    assert set(report["runs"]["sold-out"]["hello"]["outcomes"]) == {"200"}


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)"
)
def test_throughput_runs_can_be_driven_by_wrk() -> None:
    report = bench(
        "--scenario", "workers", "--duration", "1", "--concurrency", "32", "--generator", "wrk"
    )
    for name, run in report["runs"]["workers"].items():
        assert run["generator"] == "wrk", name
        assert run["requests"] > 0
        assert set(run["outcomes"]) == {"409"}  # sold out, every one
        assert run["outcomes"]["409"]["p99_ms"] == run["p99_ms"]
        assert run["redis_commands_per_request"] < 0.05
        assert run["p50_ms"] <= run["p99_ms"]
    assert [t["target"][:2] for t in report["targets"]] == ["e."]


def test_latency_is_compared_at_half_a_tenth_and_a_fixed_rate() -> None:
    report = bench(
        "--scenario", "latency", "--duration", "1", "--concurrency", "32", "--latency-rate", "150"
    )
    runs = report["runs"]
    assert set(runs) == {"saturated", "latency", "latency at a tenth", "latency at a fixed rate"}
    fixed = runs["latency at a fixed rate"]
    for name in ("flashgate", "direct"):
        assert fixed[name]["requests"] > 0
        assert "connection-lost" not in fixed[name]["outcomes"]
        assert all(code.startswith("2") for code in fixed[name]["outcomes"]), fixed[name]
    assert fixed["direct"]["requests_per_second"] < 200  # paced, not flat out
    goals = [t["target"].strip() for t in report["targets"]]
    assert goals[0].startswith("d.")
    assert goals[2] == "the same at 150 requests/s (--latency-rate)"
