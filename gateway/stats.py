"""The Prometheus metric families of flashgate, declared in one place.

Declarations only: who observes them is spread over the layers (the backend's
timings in forwarding, the decision time at the edge, reloads in core), and the
publisher moves hot-path counts into them once a second. No label carries a user,
an address or a reservation id: series are bounded by campaigns x codes.
"""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram

try:
    VERSION = metadata.version("flashgate")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "unknown"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter(
    "flashgate_requests_total",
    "Purchase requests answered, by campaign and outcome (a problem code, ok, queued, "
    "replayed or upstream-refused).",
    ["campaign", "code"],
)
REQUEST_SECONDS = Histogram(
    "flashgate_request_duration_seconds",
    "Purchase requests from arrival to answer, the backend's time included, by campaign and "
    "outcome class (ok, refused, upstream-refused, failed). Answers from memory (sold-out "
    "flag, sale window) are not timed: flashgate_requests_total counts them.",
    ["campaign", "outcome"],
    buckets=LATENCY_BUCKETS,
)
BUILD_INFO = Gauge(
    "flashgate_build_info",
    "1, labelled with the running flashgate's version and Python's.",
    ["version", "python"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(VERSION, platform.python_version()).set(1)
DECISION_SECONDS = Histogram(
    "flashgate_decision_seconds",
    "Time from a purchase request's arrival to Redis's decision.",
    ["campaign"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_SECONDS = Histogram(
    "flashgate_upstream_seconds",
    "Time the order backend took to answer.",
    ["upstream"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_RESPONSES = Counter(
    "flashgate_upstream_responses_total",
    "Answers of the order backend by status class (2xx, 4xx, 5xx, error, timeout).",
    ["upstream", "class"],
)
REDIS_SECONDS = Histogram(
    "flashgate_redis_seconds",
    "Redis round trips (one auto-pipeline each).",
    buckets=LATENCY_BUCKETS,
)
REDIS_ERRORS = Counter(
    "flashgate_redis_errors_total",
    "Redis calls that failed or missed their deadline, by operation.",
    ["operation"],
)
LIMIT_REFUSALS = Counter(
    "flashgate_limit_refusals_total",
    "Requests a limit refused (mode enforce) or would have refused (mode shadow).",
    ["campaign", "limit", "mode"],
)
DELIVERIES = Counter(
    "flashgate_deliveries_total",
    "Queue-mode delivery attempts by result (accepted, refused, failed, dead-lettered).",
    ["campaign", "result"],
)
RELOADS = Counter("flashgate_config_reloads_total", "Configuration reloads by result.", ["result"])
UNREPLICATED = Counter(
    "flashgate_redis_unreplicated_total",
    "Redis round trips that failed (closed) because too few replicas or AOFs confirmed "
    "their writes in time (redis.wait_for_replicas, redis.wait_for_aof).",
)
CIRCUIT_OPEN = Gauge(
    "flashgate_redis_circuit_open",
    "1 while a Redis circuit breaker of a process is open (one per cluster node).",
    multiprocess_mode="livemax",
)
CIRCUIT_OPENINGS = Counter(
    "flashgate_redis_circuit_openings_total",
    "Times the Redis circuit breaker of a process opened.",
)
LOOP_STALL_SECONDS = Gauge(
    "flashgate_event_loop_stall_seconds",
    "Longest event-loop stall in the last second (the process was too busy to run).",
    multiprocess_mode="livemax",
)
#: From a few seconds (a small sale) to an hour (a pre-queue opened long before the start).
WAIT_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
WAITING_ROOM_WAIT_SECONDS = Histogram(
    "flashgate_waiting_room_wait_seconds",
    "Time from joining a waiting room to the pass, observed by the process that issued it.",
    ["campaign"],
    buckets=WAIT_BUCKETS,
)
WAITING_ROOM_POLLS = Counter(
    "flashgate_waiting_room_polls_total",
    "Waiting-room polls answered by this process.",
    ["campaign"],
)
WAITING_ROOM_REDIS_CHECKS = Counter(
    "flashgate_waiting_room_redis_checks_total",
    "Waiting-room polls that asked Redis (a waiter this process had no recent word on); "
    "the rest were answered from memory.",
    ["campaign"],
)
