"""A short bench run: the harness works end to end, every sale it runs is correct,
and every figure it promises is in the ``--json`` report. Speed is never asserted
here (docs/benchmarks.md has the figures and how to get them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis as SyncRedis

from gateway.bench import SCENARIOS
from gateway.bench.crowd import Crowd, _plan
from gateway.bench.scenarios import SCENARIO_RUNS
from gateway.bench.wrk import script
from gateway.embedded.server import EmbeddedRedis
from gateway.embedded.topology import ClusterTopology, SentinelTopology

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Figures every selling run reports (None allowed only where noted in the test).
REDIS_WORK = (
    "redis_commands_per_request",
    "redis_commands_by_name",
    "winners",
    "script_calls",
    "script_calls_per_winner",
)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
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


def bench(*args: str) -> dict[str, Any]:
    result = run_bench(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def targets(report: dict[str, Any]) -> list[str]:
    return [t["target"].strip() for t in report["targets"]]


def assert_every_request_keyed(run: dict[str, Any]) -> None:
    sent = run["sent"]
    assert sent["keyed"] == sent["issued"] > 0, sent
    assert sent["keyed_share"] == 1.0
    assert 0 < sent["distinct_users"] <= sent["issued"]
    assert sent["buyers"] >= sent["distinct_users"]


def test_every_scenario_has_something_to_run() -> None:
    assert set(SCENARIO_RUNS) == set(SCENARIOS)


@pytest.mark.parametrize(("share", "keyed"), [(0.0, 0), (1.0, 500)])
def test_the_crowd_sends_keys_to_the_share_asked(share: float, keyed: int) -> None:
    crowd = Crowd("127.0.0.1", 1, "/", buyers=10, concurrency=1, requests=500, keyed_share=share)
    plan = list(_plan(crowd))
    assert sum(1 for _, _, key, _ in plan if key) == keyed
    assert len({key for _, _, key, _ in plan if key}) == keyed  # each its own key


def test_the_wrk_script_draws_users_and_keys_like_the_crowd() -> None:
    lua = script(5000, 0.25)
    assert "local buyers, keyed_share = 5000, 0.25" in lua
    assert "Idempotency-Key" in lua
    assert "function request()" in lua


def test_oversubscribed_sale_is_correct_for_every_design() -> None:
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
    assert set(runs) == {"naive", "deduct-only", "flashgate"}
    for name, run in runs.items():
        verdict = run["verdict"]
        assert verdict["correct"] is True, (name, verdict)
        assert (verdict["stock_total"], verdict["sold"], verdict["oversold"]) == (20, 20, 0)
        assert run["requests"] == 1500
        assert sum(o["count"] for o in run["outcomes"].values()) == 1500
        assert run["winners"] == 20
        assert all(run[figure] is not None for figure in REDIS_WORK), name
        assert_every_request_keyed(run)
    assert runs["deduct-only"]["verdict"]["counter_never_below_zero"] is True
    flashgate = runs["flashgate"]
    assert flashgate["decided"] >= 20
    for figure in ("redis_round_trips_per_decision", "redis_round_trips_per_winner"):
        assert flashgate[figure] is not None, figure
    # one per request (and again for the first few, told NOSCRIPT before the script loaded)
    assert runs["deduct-only"]["redis_commands_by_name"]["evalsha"] >= 1500
    assert targets(report) == [
        "b. oversubscribed, keyed: flashgate vs naive deduct-only",
        "oversubscribed: flashgate vs naive full reserve",
        "oversubscribed: script calls per winner",
        "oversubscribed: Redis round trips per winner",
        "oversubscribed: Redis round trips per decision",
    ]
    assert all(t["measured"] is not None for t in report["targets"])


def test_sold_out_path_makes_no_redis_calls_per_request() -> None:
    report = bench(
        "--scenario", "sold-out", "--duration", "1", "--concurrency", "32", "--generator", "crowd"
    )
    runs = report["runs"]["sold-out"]
    assert set(runs["flashgate"]["outcomes"]) == {"sold-out"}
    assert set(runs["fixed 409"]["outcomes"]) == {"sold-out"}  # the very same answer
    assert set(runs["hello"]["outcomes"]) == {"200"}
    for run in runs.values():
        assert_every_request_keyed(run)
        assert run["redis_background_commands_per_second"] is not None
    # keyed requests from users who hold nothing: answered from memory, not one per request
    assert runs["flashgate"]["redis_commands_per_request_net"] < 0.05
    assert targets(report)[:2] == [
        "a. sold out, keyed: flashgate vs aiohttp web.Server's fixed 409",
        "a. sold out: Redis commands per request, net of the background",
    ]
    assert all(t["measured"] is not None for t in report["targets"])


def test_everyone_wins_is_correct_and_counts_script_calls_per_winner() -> None:
    report = bench("--scenario", "everyone-wins", "--duration", "1", "--concurrency", "32")
    runs = report["runs"]["everyone-wins"]
    for name, run in runs.items():
        assert run["verdict"]["correct"] is True, (name, run["verdict"])
        assert set(run["outcomes"]) == {"201"}
        assert run["winners"] == run["requests"] > 0
        assert_every_request_keyed(run)
    flashgate = runs["flashgate"]
    assert flashgate["upstream_calls"] == flashgate["winners"]  # every winner forwarded
    for figure in ("script_calls_per_winner", "redis_round_trips_per_winner"):
        assert flashgate[figure] is not None, figure
    assert targets(report) == [
        "c. everyone wins, forwarded: flashgate vs naive deduct-only",
        "c. everyone wins: script calls per winner",
        "everyone wins: Redis round trips per winner",
    ]
    assert all(t["measured"] is not None for t in report["targets"])


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)"
)
def test_throughput_runs_can_be_driven_by_wrk_with_keys() -> None:
    report = bench(
        "--scenario", "workers", "--duration", "1", "--concurrency", "32", "--generator", "wrk"
    )
    for name, run in report["runs"]["workers"].items():
        assert run["generator"] == "wrk", name
        assert run["requests"] > 0
        assert set(run["outcomes"]) == {"409"}  # sold out, every one
        assert run["outcomes"]["409"]["p99_ms"] == run["p99_ms"]
        assert run["redis_commands_per_request_net"] < 0.05
        assert run["p50_ms"] <= run["p99_ms"]
        assert_every_request_keyed(run)
    assert targets(report) == ["e. --workers 2 vs 1, sold out, keyed"]


def test_latency_is_compared_at_a_fixed_rate_and_at_half_and_a_tenth() -> None:
    report = bench(
        "--scenario", "latency", "--duration", "1", "--concurrency", "32", "--latency-rate", "150"
    )
    runs = report["runs"]
    assert set(runs) == {
        "latency at a fixed rate",
        "saturated",
        "latency at half the saturated rate",
        "latency at a tenth",
    }
    fixed = runs["latency at a fixed rate"]
    for name in ("flashgate", "direct"):
        assert fixed[name]["requests"] > 0
        assert "connection-lost" not in fixed[name]["outcomes"]
        assert all(code.startswith("2") for code in fixed[name]["outcomes"]), fixed[name]
        assert_every_request_keyed(fixed[name])
    assert fixed["direct"]["requests_per_second"] < 200  # paced, not flat out
    assert targets(report) == [
        "d. p99 added over the backend, paced at 150 winners/s",
        "the same at half the saturated rate",
        "the same at a tenth of it",
    ]


def test_idle_cost_is_measured_per_catalogue_and_process() -> None:
    report = bench(
        "--scenario",
        "idle",
        "--idle-campaigns",
        "1,3",
        "--idle-settle",
        "1",
        "--idle-window",
        "1",
    )
    idle = report["idle"]
    assert idle["redis_background_commands_per_second"] is not None
    shapes = [(g["campaigns"], g["workers"]) for g in idle["gateways"]]
    assert shapes == [(1, 1), (1, 2), (3, 1), (3, 2)]
    for gateway in idle["gateways"]:
        assert gateway["redis_commands_per_second"] > 0  # a gateway polls, even idle
        assert gateway["redis_commands_per_second_net"] is not None
        assert gateway["redis_commands_per_second_by_name"]
        roles = sorted(p["role"] for p in gateway["processes"])
        if gateway["workers"] == 1:
            assert roles == ["gateway"]
        else:
            assert roles.count("worker") == 2, roles
            assert "supervisor" in roles
        assert all(p["cpu_percent_of_a_core"] is not None for p in gateway["processes"])
        assert gateway["max_cpu_percent_of_a_core"] is not None
    assert targets(report) == [
        "idle, 3 campaigns, 1 worker(s): Redis commands/s",
        "idle, 3 campaigns, 1 worker(s): CPU per process, % of a core (most)",
        "idle, 3 campaigns, 2 worker(s): Redis commands/s",
        "idle, 3 campaigns, 2 worker(s): CPU per process, % of a core (most)",
    ]
    assert all(t["met"] is None for t in report["targets"])  # the goals are at 1,000


def assert_replicas_compared(report: dict[str, Any]) -> None:
    for scenario in ("replicas: oversubscribed", "replicas: everyone-wins"):
        runs = report["runs"][scenario]
        assert set(runs) == {"wait_for_replicas=0", "wait_for_replicas=1"}
        for name, run in runs.items():
            assert run["verdict"]["correct"] is True, (scenario, name, run["verdict"])
        assert "wait" not in runs["wait_for_replicas=0"]["redis_commands_by_name"]
        assert runs["wait_for_replicas=1"]["redis_commands_by_name"]["wait"] > 0
    assert targets(report) == [
        "replicas, oversubscribed: wait_for_replicas 1 vs 0 throughput",
        "replicas, everyone wins: wait_for_replicas 1 vs 0 throughput",
    ]
    assert all(t["measured"] is not None for t in report["targets"])


SMALL_SALE = ("--requests", "600", "--stock", "10", "--duration", "1", "--concurrency", "32")


def test_replicas_are_compared_on_a_sentinel_topology_of_the_benchs_own() -> None:
    report = bench("--scenario", "replicas", *SMALL_SALE)
    assert_replicas_compared(report)
    run = report["runs"]["replicas: oversubscribed"]["wait_for_replicas=1"]
    assert "Sentinel" in run["redis"]


def test_redis_url_runs_every_design_on_a_sentinel_primary(
    fresh_sentinel: Callable[..., SentinelTopology],
) -> None:
    topology = fresh_sentinel()
    report = bench("--redis", topology.url, "--scenario", "replicas", *SMALL_SALE)
    assert report["options"]["redis"].startswith(topology.url)
    assert_replicas_compared(report)


def test_redis_url_runs_the_baselines_on_the_campaigns_cluster_node(
    fresh_cluster: Callable[..., ClusterTopology],
) -> None:
    topology = fresh_cluster(primaries=3, replicas_per_primary=0)
    report = bench(
        "--redis",
        topology.url,
        "--scenario",
        "oversubscribed",
        "--scenario",
        "sold-out",
        "--generator",
        "crowd",
        *SMALL_SALE,
    )
    assert "3 primaries" in report["options"]["redis"]
    for name, run in report["runs"]["oversubscribed"].items():
        assert run["verdict"]["correct"] is True, (name, run["verdict"])
    assert report["runs"]["sold-out"]["flashgate"]["redis_commands_per_request_net"] < 0.05


def test_redis_url_must_be_empty_and_have_replicas_for_the_replicas_scenario() -> None:
    with EmbeddedRedis() as server:
        refused = run_bench("--redis", server.url, "--scenario", "replicas")
        assert refused.returncode == 3
        assert "needs a primary with replicas" in refused.stderr
        client = SyncRedis.from_url(server.url)
        client.set("someone-elses", "data")
        client.close()
        refused = run_bench("--redis", server.url, "--scenario", "oversubscribed")
        assert refused.returncode == 3
        assert "holds 1 keys" in refused.stderr


def test_a_redis_url_that_is_not_one_is_refused() -> None:
    refused = run_bench("--redis", "http://127.0.0.1:6379")
    assert refused.returncode == 2
    assert "--redis" in refused.stderr


SHARDED_SALE = ("--requests", "300", "--stock", "12", "--concurrency", "16", "--duration", "0.3")


def test_shards_sell_exactly_the_stock_and_reserve_lua_is_driven_on_every_node() -> None:
    """On the bench's own cluster: both sales correct per shard and in total, the script
    time read from every primary, every Redis-side call a reservation (no timing)."""
    report = bench("--scenario", "shards", *SHARDED_SALE)
    sale = report["runs"]["shards: flashgate"]
    assert set(sale) == {"shards=1", "shards=6"}
    for name, run in sale.items():
        verdict = run["verdict"]
        assert verdict["correct"] is True, (name, verdict)
        assert (verdict["stock_total"], verdict["sold"], verdict["oversold"]) == (12, 12, 0)
        assert verdict["nothing_in_flight"] is True
        assert verdict["shards_hold_the_stock"] is True
        assert run["winners"] == 12
        assert len(run["script_usec_by_node"]) == 3, run["script_usec_by_node"]
        assert run["busiest_node_script_share"] is not None
        assert_every_request_keyed(run)
    assert "Cluster: 3 primaries" in sale["shards=6"]["redis"]
    assert [s["sold"] for s in sale["shards=1"]["verdict"]["shards"]] == [12]
    assert len(sale["shards=6"]["verdict"]["shards"]) == 6
    assert sorted(sale["shards=6"]["shards_by_node"].values()) == [2, 2, 2]
    redis_side = report["runs"]["shards: Redis side"]
    assert set(redis_side) == {"one node", "cluster"}
    for name, run in redis_side.items():
        assert run["verdict"]["correct"] is True, (name, run["verdict"])
        assert set(run["outcomes"]) == {"reserved"}
        assert run["script_time_capacity"] is not None
    assert redis_side["one node"]["verdict"]["nodes_driven"] == 1
    assert redis_side["cluster"]["verdict"]["nodes_driven"] == 3
    assert targets(report) == [
        "shards: busiest node's share of script time, 6 shards",
        "the same with one shard",
        "flashgate throughput, 6 shards vs 1",
        "shards, Redis side: script-time capacity, cluster vs one node",
        "Redis side: decisions/s, cluster vs one node",
        f"the bound that applies ({os.cpu_count()} CPUs, 3 nodes and 3 drivers)",
    ]
    assert all(t["measured"] is not None for t in report["targets"])
