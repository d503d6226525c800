"""Operator commands that work on Redis directly: ``reconcile`` and ``status``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

from gateway.config import Settings
from gateway.core.runtime import campaign_store
from gateway.operations.terminal import Progress, table
from limiter.audit import Audit, audit
from limiter.connection import connect
from limiter.errors import CampaignMissing
from limiter.guard import RedisGuard
from limiter.pipeline import AutoPipeline
from limiter.scripts import Scripts
from limiter.store import CampaignStore

#: Operator tools may run big scripts (an audit reads every reservation).
TOOL_TIMEOUT = 30.0
#: ``status`` reads a few keys per campaign: a hung Redis should not keep it waiting.
STATUS_TIMEOUT = 3.0


class UnknownCampaign(LookupError):
    pass


@contextlib.asynccontextmanager
async def campaign_stores(
    settings: Settings, redis_url: str, only: str | None = None, deadline: float = TOOL_TIMEOUT
) -> AsyncIterator[list[CampaignStore]]:
    campaigns = [c for c in settings.campaigns if only is None or c.id == only]
    if only is not None and not campaigns:
        raise UnknownCampaign(f"no campaign {only!r} in the config")
    redis = connect(redis_url, max_connections=4, timeout=deadline)
    guard = RedisGuard(deadline)
    pipe = AutoPipeline(redis, guard)
    scripts = Scripts.register(redis)
    try:
        yield [campaign_store(settings, c, pipe, scripts) for c in campaigns]
    finally:
        await pipe.close()
        guard.close()
        await redis.aclose()
        await redis.connection_pool.disconnect()


async def reconcile(
    settings: Settings, redis_url: str, *, only: str | None, repair: bool, progress: bool
) -> list[Audit]:
    actor = f"reconcile@{socket.gethostname()}:{os.getpid()}"
    audits = []
    async with campaign_stores(settings, redis_url, only) as stores:
        bar = Progress(len(stores), "auditing", enabled=progress and len(stores) > 1)
        for store in stores:
            audits.append(await audit(store, repair=repair, actor=actor))
            bar.advance()
        bar.close()
    return audits


def render_audits(audits: Sequence[Audit], config: str) -> str:
    rows: list[tuple[object, ...]] = []
    for a in audits:
        for what, counter, expected in a.checks():
            rows.append((a.campaign_id, what, counter, expected, counter - expected))
    lines = [table(["campaign", "check", "counter", "expected", "drift"], rows)]
    for a in audits:
        for user, units, by_records in a.user_drift[:10]:
            lines.append(
                f"{a.campaign_id}: user {user!r} holds {units} by the quota hash, "
                f"{by_records} by the records"
            )
        if a.repair_refused:
            lines.append(
                f"{a.campaign_id}: NOT repaired: {a.missing_records} reservation(s) in the index "
                "have no record (did Redis lose data?); the records would undercount what was "
                "sold. Restore Redis from its AOF, or settle the counters by hand against the "
                "backend's orders and the ledger."
            )
        if a.repaired is not None:
            lines.append(
                f"{a.campaign_id}: repaired: counters now {a.repaired.available} "
                f"available, {a.repaired.reserved} reserved, {a.repaired.sold} sold, "
                f"{a.repaired.stock_total} total (the reservation records won)"
            )
    drifting = [a.campaign_id for a in audits if a.drift]
    if drifting and not any(a.repaired or a.repair_refused for a in audits):
        lines.append(
            f"drift in {', '.join(drifting)}: `flashgate reconcile -c {config} --repair` "
            "makes the counters agree with the reservation records"
        )
    elif not drifting:
        lines.append("no drift: the books balance")
    return "\n".join(lines)


def audits_json(audits: Sequence[Audit]) -> str:
    documents: list[dict[str, Any]] = []
    for a in audits:
        document = asdict(a)
        for name in ("counters", "ledger_after", "repaired"):
            figures = getattr(a, name)
            document[name] = figures._asdict() if figures is not None else None
        document["user_drift"] = [
            {"user": user, "quota": quota, "records": records}
            for user, quota, records in a.user_drift
        ]
        document["checks"] = [
            {"check": what, "counter": counter, "expected": expected}
            for what, counter, expected in a.checks()
        ]
        document["drift"] = a.drift
        documents.append(document)
    return json.dumps({"campaigns": documents, "drift": any(a.drift for a in audits)})


async def status(settings: Settings, redis_url: str) -> list[dict[str, Any]]:
    """Every configured campaign with its counters from Redis (None when not created yet)."""
    rows = []
    async with campaign_stores(settings, redis_url, deadline=STATUS_TIMEOUT) as stores:
        for store, campaign in zip(stores, settings.campaigns, strict=True):
            try:
                figures: dict[str, Any] = (await store.figures())._asdict()
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
                }
            )
    return rows


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
    return text
