"""``flashgate status``: a table of the campaigns, read from Redis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.config import Settings
from gateway.operations.stores import STATUS_TIMEOUT, campaign_stores
from gateway.operations.terminal import table
from gateway.operations.waiting_rooms import render_waiting_rooms, waiting_room
from limiter.errors import CampaignMissing
from limiter.records import Figures
from limiter.store import CampaignStore


async def status(settings: Settings, redis_url: str) -> list[dict[str, Any]]:
    """Every configured campaign with its counters from Redis (None when not created yet)."""
    rows = []
    async with campaign_stores(settings, redis_url, deadline=STATUS_TIMEOUT) as campaigns:
        for stores, campaign in zip(campaigns, settings.campaigns, strict=True):
            try:
                figures: dict[str, Any] = (await _totals(stores))._asdict()
            except CampaignMissing:
                figures = dict.fromkeys(("available", "reserved", "sold", "stock_total"))
            rate = campaign.rate_limit
            rows.append(
                {
                    "id": campaign.id,
                    "route": str(campaign.route),
                    **figures,
                    "sold_out": figures["available"] == 0
                    if figures["available"] is not None
                    else None,
                    "balanced": _balanced(figures),
                    "starts_at": campaign.starts_at.isoformat() if campaign.starts_at else None,
                    "ends_at": campaign.ends_at.isoformat() if campaign.ends_at else None,
                    "rate_per_second": rate.per_second if rate else None,
                    "forward": campaign.forward,
                    "shards": campaign.shards,
                }
            )
            rows[-1]["waiting_room"] = await waiting_room(settings, campaign, stores[0])
    return rows


async def _totals(stores: Sequence[CampaignStore]) -> Figures:
    """A campaign's counters summed over its shards (units on their way between two
    shards count as stock, and as available)."""
    each = [await store.figures() for store in stores]
    moving = sum([(await store.balance())[1] for store in stores]) if len(stores) > 1 else 0
    summed = Figures(*(sum(column) for column in zip(*each, strict=True)))
    return summed._replace(
        available=summed.available + moving, stock_total=summed.stock_total + moving
    )


def _balanced(figures: dict[str, Any]) -> bool | None:
    """stock_total == available + reserved + sold (None: not in Redis)."""
    if figures["stock_total"] is None:
        return None
    return bool(
        figures["stock_total"] == figures["available"] + figures["reserved"] + figures["sold"]
    )


def render_status(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "campaign",
        "stock total",
        "available",
        "reserved",
        "sold",
        "books",
        "sold out",
        "window",
        "rate/s",
        "forward",
    ]
    lines = []
    for r in rows:
        window = (
            "always"
            if not (r["starts_at"] or r["ends_at"])
            else (f"{r['starts_at'] or '...'} .. {r['ends_at'] or '...'}")
        )
        lines.append(
            (
                r["id"],
                r["stock_total"],
                r["available"],
                r["reserved"],
                r["sold"],
                {True: "ok", False: "DRIFT", None: None}[r["balanced"]],
                r["sold_out"],
                window,
                r["rate_per_second"],
                r["forward"],
            )
        )
    missing = [r["id"] for r in rows if r["stock_total"] is None]
    text = table(headers, lines)
    if missing:
        text += f"\nnot in Redis yet (a gateway creates them when it starts): {', '.join(missing)}"
    drifting = [r["id"] for r in rows if r["balanced"] is False]
    if drifting:
        text += (
            f"\nthe books do not balance for {', '.join(drifting)}: "
            "run `flashgate reconcile` (docs/operations.md, Recover)"
        )
    text += render_waiting_rooms(rows)
    return text
