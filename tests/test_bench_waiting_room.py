"""A short run of ``flashgate bench --scenario waiting-room``: it runs end to end and what
it measures is sound (every poll answered, every sold-out purchase refused, admission
within admit_rate's bound, the figures reported). Speed is not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from gateway.bench.waiting_room import ADMIT_RATE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def bench(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--log-level", "warning", "bench", "--json", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_the_waiting_room_scenario_measures_polls_against_the_sold_out_path() -> None:
    report = bench(
        "--scenario", "waiting-room", "--rounds", "1", "--duration", "1", "--concurrency", "8"
    )
    runs = report["runs"]["waiting-room"]
    polls, sold_out = runs["polls"], runs["sold-out path"]
    assert polls["requests"] > 0
    assert set(polls["outcomes"]) == {"200"}
    assert polls["verdict"]["correct"] is True
    assert set(sold_out["outcomes"]) == {"409"}
    # measured between two views by Redis's clock: within a tick's worth of admit_rate
    issued = polls["verdict"]["passes_issued_per_second"]
    assert 0 < issued <= ADMIT_RATE * 1.5 + 1
    assert polls["redis_commands_per_request"] >= 0
    assert sold_out["verdict"]["correct"] is True
    names = [t["target"].strip() for t in report["targets"]]
    assert names == [
        "waiting room: polls vs the sold-out path",
        "Redis commands per poll (the background included)",
        f"passes issued per second vs admit_rate ({ADMIT_RATE:g})",
    ]
