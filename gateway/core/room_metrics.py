"""The waiting rooms' figures for Prometheus, read from Redis at scrape time (the view
every gateway shares, see queue_tick.lua): correct under ``--workers`` and across
hosts, whichever process Prometheus reaches. Labels: the campaign only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.admission.room import VIEW_TTL_MS
from gateway.core.campaigns import Campaign
from limiter.waiting import View

#: name, help, the view's figure
GAUGES = (
    ("flashgate_waiting_room_waiting", "Waiters in line, from Redis.", "length"),
    (
        "flashgate_waiting_room_passes_outstanding",
        "Passes issued, unexpired and not used yet, from Redis.",
        "outstanding",
    ),
    (
        "flashgate_waiting_room_passes_cap",
        "max_passes_per_unit x available: what the passes outstanding may not exceed.",
        "cap",
    ),
)
COUNTERS = (
    ("flashgate_waiting_room_joins", "Places given in the waiting room, from Redis.", "joined"),
    ("flashgate_waiting_room_passes_issued", "Passes issued, from Redis.", "issued"),
    ("flashgate_waiting_room_passes_used", "Passes that bought, from Redis.", "used"),
    (
        "flashgate_waiting_room_passes_expired",
        "Passes not used within pass_ttl (their slot went to the next waiter), from Redis.",
        "expired",
    ),
    (
        "flashgate_waiting_room_passes_withdrawn",
        "Passes withdrawn because stock fell below what they allowed, from Redis.",
        "withdrawn",
    ),
    (
        "flashgate_waiting_room_closed",
        "Waiters told closed (too far back for the stock left, or sold out), from Redis.",
        "closed",
    ),
    (
        "flashgate_waiting_room_abandoned",
        "Waiters who stopped polling for a heartbeat and lost their place, from Redis.",
        "abandoned",
    ),
)


async def read_room_views(campaigns: Iterable[Campaign]) -> list[tuple[str, View]]:
    """Every waiting room's shared view (one script call each, computed only when stale)."""
    rooms = [(c.id, c.room) for c in campaigns if c.room is not None]
    ticks = await asyncio.gather(*(room.store.tick(VIEW_TTL_MS) for _, room in rooms))
    return [(campaign_id, t.view) for (campaign_id, _), t in zip(rooms, ticks, strict=True)]


def room_families(rooms: Sequence[tuple[str, View]]) -> Iterator[Metric]:
    if not rooms:
        return
    for name, documentation, figure in GAUGES:
        gauge = GaugeMetricFamily(name, documentation, labels=["campaign"])
        for campaign_id, view in rooms:
            gauge.add_metric([campaign_id], getattr(view, figure))
        yield gauge
    for name, documentation, figure in COUNTERS:
        counter = CounterMetricFamily(name, documentation, labels=["campaign"])
        for campaign_id, view in rooms:
            counter.add_metric([campaign_id], getattr(view, figure))
        yield counter
