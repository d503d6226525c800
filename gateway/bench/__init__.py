"""``flashgate bench``: flash sales on this machine, flashgate against baselines run
in the same script, reported as ratios. Imported by the CLI only, and lazily: this
module stays small so that ``flashgate run`` does not load the harness."""

#: What ``--scenario`` may name; all of them by default, run in this order
#: (gateway/bench/scenarios.py maps each to what it runs).
SCENARIOS = (
    "oversubscribed",
    "sold-out",
    "everyone-wins",
    "round-trips",
    "latency",
    "workers",
    "access-log",
    "idle",
    "replicas",
    "waiting-room",
    "shards",
)
