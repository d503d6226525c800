"""``flashgate reconcile``: every campaign's counters against its reservation
records and its ledger, in a table (or JSON), with an optional repair."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from gateway.config import Settings
from gateway.operations.stores import campaign_stores
from gateway.operations.terminal import Progress, table
from limiter.audit import Audit, audit


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
