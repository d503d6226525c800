"""Publishing metrics: the hot-path counts of one process into the Prometheus
families (gateway/stats.py) every second, and the figures that belong to a campaign
(stock, reservations by state, the queue) read from Redis when Prometheus scrapes,
never guessed per process.

Counters on the hot path are plain integers (a request answered from the local
sold-out flag costs a dict increment, not a locked write to a shared file). With
``--workers N`` prometheus-client's multiprocess mode adds up every worker's
counters, whichever worker Prometheus reaches.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.core.campaigns import Campaign
from gateway.core.room_metrics import read_room_views, room_families
from gateway.core.snapshot import SnapshotHolder
from gateway.stats import (
    CIRCUIT_OPEN,
    CIRCUIT_OPENINGS,
    DELIVERIES,
    LIMIT_REFUSALS,
    LOOP_STALL_SECONDS,
    REDIS_ERRORS,
    REDIS_SECONDS,
    REQUEST_SECONDS,
    REQUESTS,
    UNREPLICATED,
    VERSION,
    WAITING_ROOM_POLLS,
    WAITING_ROOM_REDIS_CHECKS,
)
from limiter.guard import RedisGuard
from limiter.pipeline import AutoPipeline
from limiter.waiting import View


@dataclass
class HotCounters:
    """Counts taken on the hot path, published by ``flush()`` once a second."""

    requests: Tally[tuple[str, str]] = field(default_factory=Tally)
    #: (campaign, outcome code, seconds) of the requests timed since the last flush
    durations: list[tuple[str, str, float]] = field(default_factory=list)

    def request(self, campaign: str, code: str) -> None:
        self.requests[(campaign, code)] += 1

    def duration(self, campaign: str, code: str, seconds: float) -> None:
        """A list append on the hot path; the histogram is observed once a second."""
        self.durations.append((campaign, code, seconds))

    def flush(self) -> None:
        requests, self.requests = self.requests, Tally()
        for (campaign, code), count in requests.items():
            REQUESTS.labels(campaign, code).inc(count)
        durations, self.durations = self.durations, []
        for campaign, code, seconds in durations:
            REQUEST_SECONDS.labels(campaign, outcome_class(code)).observe(seconds)


#: Outcome codes that are a success, and the problem codes that are a failure (5xx).
SUCCESS = frozenset({"ok", "queued", "replayed"})
FAILURE = frozenset({"internal", "upstream-failed", "upstream-timeout", "unavailable"})


def outcome_class(code: str) -> str:
    """ok, refused (the gateway said no: 4xx), upstream-refused, failed (5xx)."""
    if code in SUCCESS:
        return "ok"
    if code in FAILURE:
        return "failed"
    return "upstream-refused" if code == "upstream-refused" else "refused"


@dataclass(frozen=True)
class CampaignFigures:
    """What Redis says about one campaign at scrape time."""

    campaign: str
    counters: dict[str, int]
    reservations: dict[str, int]
    queue_depth: int
    dead_letters: int


class RedisFigures(Collector):
    """Gauges from Redis, filled in just before a scrape (see ``exposition``)."""

    STATES = ("reserved", "held", "committed", "released", "expired", "cancelled")

    def __init__(self) -> None:
        self.campaigns: Sequence[CampaignFigures] = ()
        self.processes: int | None = None
        #: Whether Redis answered for this scrape (without it the figures are missing).
        self.read = False
        #: The waiting rooms' views, by campaign.
        self.rooms: Sequence[tuple[str, View]] = ()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "flashgate_redis_figures_up",
            "1 when this scrape read the campaigns' figures from Redis (alerts on them "
            "go stale, not quiet, while it is 0).",
        )
        up.add_metric([], 1 if self.read else 0)
        yield up
        info = GaugeMetricFamily("flashgate_build", "The running flashgate.", labels=["version"])
        info.add_metric([VERSION], 1)
        yield info
        units = GaugeMetricFamily(
            "flashgate_stock_units", "Units by bucket, from Redis.", labels=["campaign", "state"]
        )
        sold_out = GaugeMetricFamily(
            "flashgate_sold_out", "1 when nothing is left, from Redis.", labels=["campaign"]
        )
        balanced = GaugeMetricFamily(
            "flashgate_books_balanced",
            "1 when stock_total == available + reserved + sold, from Redis.",
            labels=["campaign"],
        )
        reservations = GaugeMetricFamily(
            "flashgate_reservations",
            "Reservations by state, from Redis.",
            labels=["campaign", "state"],
        )
        queue = GaugeMetricFamily(
            "flashgate_queue_depth", "Orders waiting for or in delivery.", labels=["campaign"]
        )
        dead = GaugeMetricFamily(
            "flashgate_dead_letters",
            "Orders given up on (kept for inspection).",
            labels=["campaign"],
        )
        for c in self.campaigns:
            figures = c.counters
            for state in ("available", "reserved", "sold", "stock_total"):
                units.add_metric([c.campaign, state], figures.get(state, 0))
            sold_out.add_metric([c.campaign], 1 if figures.get("available", 0) == 0 else 0)
            total = (
                figures.get("available", 0) + figures.get("reserved", 0) + figures.get("sold", 0)
            )
            balanced.add_metric([c.campaign], 1 if figures.get("stock_total", 0) == total else 0)
            for state in self.STATES:
                reservations.add_metric([c.campaign, state], c.reservations.get(state, 0))
            queue.add_metric([c.campaign], c.queue_depth)
            dead.add_metric([c.campaign], c.dead_letters)
        yield from (units, sold_out, balanced, reservations, queue, dead)
        if self.processes is not None:
            alive = GaugeMetricFamily(
                "flashgate_gateway_processes", "Gateway processes alive, by their heartbeat."
            )
            alive.add_metric([], self.processes)
            yield alive
        yield from room_families(self.rooms)


def exposition(redis_figures: RedisFigures) -> tuple[bytes, str]:
    """The text Prometheus scrapes: every worker's counters plus the Redis figures."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    text = generate_latest(registry) + generate_latest(_Only(redis_figures))
    return text, CONTENT_TYPE_LATEST


class _Only(CollectorRegistry):
    """A registry of one collector, built per scrape."""

    def __init__(self, collector: Collector) -> None:
        super().__init__(auto_describe=False)
        self._collector = collector

    def collect(self) -> Iterable[Metric]:
        yield from self._collector.collect()


class Publisher:
    """Moves one process's counts into the Prometheus metrics (every second, and
    before each scrape)."""

    def __init__(
        self,
        live: SnapshotHolder,
        guard: RedisGuard,
        pipe: AutoPipeline,
        deliveries: Tally[tuple[str, str]] | None,
    ) -> None:
        self.live = live
        self.guard = guard
        self.pipe = pipe
        #: The dispatcher's delivery results by (campaign, result), when it runs here.
        self.deliveries = deliveries
        self.hot = HotCounters()
        self._seen: dict[tuple[object, ...], int] = {}

    def flush(self) -> None:
        self.hot.flush()
        guard = self.guard
        for what, count in list(guard.errors.items()):
            self._add(REDIS_ERRORS, ("redis", what), count, what)
        self._limit_refusals()
        self._waiting_rooms()
        for (campaign_id, result), count in list((self.deliveries or {}).items()):
            self._add(DELIVERIES, ("delivery", campaign_id, result), count, campaign_id, result)
        breakers = {id(b): b for b in self.pipe.breakers()}.values()
        self._add(CIRCUIT_OPENINGS, ("openings",), sum(b.openings for b in breakers))
        self._add(UNREPLICATED, ("unreplicated",), self.pipe.unreplicated_round_trips)
        timings, self.pipe.timings = self.pipe.timings, []
        for seconds in timings:
            REDIS_SECONDS.observe(seconds)
        CIRCUIT_OPEN.set(1 if any(b.is_open for b in breakers) else 0)
        LOOP_STALL_SECONDS.set(guard.stalls.take_max_stall())

    def _limit_refusals(self) -> None:
        # A reload replaces the shapers, whose counts start again from zero: they are
        # told apart by identity, and a retired one's entries go (its id may be reused).
        current: set[int] = set()
        for campaign in self.live.current.campaigns.values():
            shaper = campaign.shaper
            for counts, mode in ((shaper.refused, "enforce"), (shaper.shadowed, "shadow")):
                current.add(id(counts))
                for limit, count in list(counts.items()):
                    self._add(LIMIT_REFUSALS, (id(counts), limit), count, campaign.id, limit, mode)
        for key in [k for k in self._seen if isinstance(k[0], int) and k[0] not in current]:
            del self._seen[key]

    def _waiting_rooms(self) -> None:
        # a room's counts live in its memory, which a reload keeps: they only grow
        for campaign in self.live.current.campaigns.values():
            if campaign.room is not None:
                counts, campaign_id = campaign.room.memory.counts, campaign.id
                self._add(WAITING_ROOM_POLLS, ("polls", campaign_id), counts["polls"], campaign_id)
                checks = counts["redis_checks"]
                self._add(WAITING_ROOM_REDIS_CHECKS, ("checks", campaign_id), checks, campaign_id)

    def _add(self, counter: Counter, key: tuple[object, ...], total: int, *labels: str) -> None:
        """Add what ``total`` (a cumulative count) grew by since the last flush."""
        grown = total - self._seen.get(key, 0)
        self._seen[key] = total
        if grown > 0:
            (counter.labels(*labels) if labels else counter).inc(grown)


async def read_redis_figures(
    pipe: AutoPipeline, campaigns: Iterable[Campaign], processes: int
) -> RedisFigures:
    """The figures Redis holds: counters, reservations by state, queue, dead letters;
    a campaign of several shards as the sum of them."""
    campaigns = list(campaigns)
    shards = [(c.id, s.store.keys) for c in campaigns for s in c.shards]
    replies = await asyncio.gather(
        *(
            reply
            for _, keys in shards
            for reply in (
                pipe.call("HGETALL", keys.state, what="read metrics"),
                pipe.call("XLEN", keys.orders, what="read metrics"),
                pipe.call("XLEN", keys.dead_letters, what="read metrics"),
            )
        )
    )
    summed: dict[str, CampaignFigures] = {}
    for i, (campaign_id, _) in enumerate(shards):
        state, queued, dead = replies[3 * i : 3 * i + 3]
        values = {k.decode(): int(v) for k, v in state.items() if v.lstrip(b"-").isdigit()}
        counters = {k: v for k, v in values.items() if not k.startswith("n:")}
        # units on their way between shards are stock, available once they land
        for name in ("available", "stock_total"):
            counters[name] = counters.get(name, 0) + counters.get("out_units", 0)
        by_state = {k[2:]: v for k, v in values.items() if k.startswith("n:")}
        figures = CampaignFigures(campaign_id, counters, by_state, int(queued), int(dead))
        summed[campaign_id] = (
            _add(summed[campaign_id], figures) if campaign_id in summed else figures
        )
    result = RedisFigures()
    result.campaigns = [summed[c.id] for c in campaigns if c.id in summed]
    result.processes = processes
    result.rooms = await read_room_views(campaigns)
    result.read = True
    return result


def _add(a: CampaignFigures, b: CampaignFigures) -> CampaignFigures:
    def plus(x: dict[str, int], y: dict[str, int]) -> dict[str, int]:
        return {k: x.get(k, 0) + y.get(k, 0) for k in x.keys() | y.keys()}

    return CampaignFigures(
        a.campaign,
        plus(a.counters, b.counters),
        plus(a.reservations, b.reservations),
        a.queue_depth + b.queue_depth,
        a.dead_letters + b.dead_letters,
    )
