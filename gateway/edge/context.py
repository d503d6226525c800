"""What the buyer-facing side needs of its process, handed over as one bundle."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.accesslog import AccessLog
from gateway.core.health import Readiness
from gateway.core.publisher import HotCounters
from gateway.core.rebalancer import Rebalancer
from gateway.core.snapshot import SnapshotHolder
from gateway.core.stockwatch import StockWatch


@dataclass(frozen=True, slots=True)
class Edge:
    #: the snapshot in force: a request reads it once and keeps it
    live: SnapshotHolder
    #: the local sold-out flags
    watch: StockWatch
    access: AccessLog
    #: per-request counts, published once a second
    counts: HotCounters
    readiness: Readiness
    #: pulls stock into a buyer's home shard when it has too little (shards: K)
    rebalancer: Rebalancer
