"""``flashgate reconcile``: every campaign's counters against its reservation
records and its ledger (each shard's, and a sharded campaign's in total), and every
cart's orders against their items, in tables (or JSON), with an optional repair."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gateway.config import Settings
from gateway.core.campaigns import stores_for
from gateway.core.carts import cart_store_for
from gateway.operations.cart_audit import CartAudit, audit_cart
from gateway.operations.stores import UnknownCampaign, tool_pipeline
from gateway.operations.terminal import Progress, table
from limiter.audit import Audit, audit
from limiter.records import Figures
from limiter.store import CampaignStore


@dataclass
class Books:
    """What reconcile found: each campaign's (or shard's) audit, each cart's."""

    campaigns: list[Audit]
    carts: list[CartAudit] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return any(a.drift for a in self.campaigns) or any(c.drift for c in self.carts)

    @property
    def repair_refused(self) -> bool:
        return any(a.repair_refused for a in self.campaigns) or any(
            c.unrepaired for c in self.carts
        )


async def reconcile(
    settings: Settings, redis_url: str, *, only: str | None, repair: bool, progress: bool
) -> Books:
    """``only``: one campaign (or cart) of the file."""
    if only is not None and settings.campaign(only) is None and settings.cart(only) is None:
        raise UnknownCampaign(f"no campaign {only!r} (nor cart) in the config")
    actor = f"reconcile@{socket.gethostname()}:{os.getpid()}"
    books = Books([])
    async with tool_pipeline(settings, redis_url) as (pipe, scripts):
        stores = {c.id: stores_for(settings, c, pipe, scripts) for c in settings.campaigns}
        audited = [s for cid, s in stores.items() if only is None or cid == only]
        books.campaigns = await _audit_campaigns(audited, repair, actor, progress)
        for cart in settings.carts:
            if only is None or cart.id == only:
                store = cart_store_for(settings, cart, pipe, scripts)
                books.carts.append(await audit_cart(store, stores, repair=repair, actor=actor))
    return books


async def _audit_campaigns(
    campaigns: list[list[CampaignStore]], repair: bool, actor: str, progress: bool
) -> list[Audit]:
    audits = []
    shards = sum(len(stores) for stores in campaigns)
    bar = Progress(shards, "auditing", enabled=progress and shards > 1)
    for stores in campaigns:
        each = []
        for index, store in enumerate(stores):
            found = await audit(store, repair=repair, actor=actor)
            # a campaign of several shards: each shard's books, each named, then the total
            each.append(replace(found, campaign_id=f"{found.campaign_id}[{index}]"))
            bar.advance()
        audits += [*each, _total(stores[0].campaign_id, each)] if len(each) > 1 else [found]
    bar.close()
    return audits


def _total(campaign_id: str, shards: list[Audit]) -> Audit:
    """A sharded campaign's books in total: each figure summed over its shards."""

    def summed(figures: list[Figures | None]) -> Figures | None:
        if any(f is None for f in figures):
            return None
        return Figures(*(sum(column) for column in zip(*figures, strict=True)))

    counters = summed([a.counters for a in shards])
    assert counters is not None
    return Audit(
        campaign_id=f"{campaign_id} (total)",
        counters=counters,
        reserved_by_records=sum(a.reserved_by_records for a in shards),
        sold_by_records=sum(a.sold_by_records for a in shards),
        users_differing=sum(a.users_differing for a in shards),
        ledger_after=summed([a.ledger_after for a in shards]),
        repaired=summed([a.repaired for a in shards]) if shards[0].repaired else None,
        missing_records=sum(a.missing_records for a in shards),
        repair_refused=any(a.repair_refused for a in shards),
    )


def render_books(books: Books, config: str) -> str:
    text = render_audits(books.campaigns, config)
    return text if not books.carts else f"{text}\n\n{render_carts(books.carts, config)}"


def render_carts(carts: Sequence[CartAudit], config: str) -> str:
    rows: list[tuple[object, ...]] = []
    for c in carts:
        states = ", ".join(f"{n} {state}" for state, n in sorted(c.orders.items())) or "none"
        rows.append((c.cart_id, states, c.settling, c.broken_orders, c.repaired))
    lines = [table(["cart", "orders", "settling", "not whole", "repaired"], rows)]
    for c in carts:
        for campaign_id, by_state in c.units.items():
            shown = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
            lines.append(f"{c.cart_id}: units of {campaign_id} in orders: {shown}")
        for order_id, item, order_state, item_state in c.broken[:10]:
            lines.append(
                f"{c.cart_id}: order {order_id} is {order_state} but its item {item} is "
                f"{item_state}"
            )
        for order_id in c.unrepaired[:10]:
            lines.append(
                f"{c.cart_id}: order {order_id} NOT repaired: an item went back to stock "
                "outside its order and is not taken again by a repair; cancel the order "
                "(POST /reservations/{id}/cancel) or settle it with the backend by hand"
            )
    broken = [c.cart_id for c in carts if c.drift and not c.repaired and not c.unrepaired]
    if broken:
        lines.append(
            f"orders not whole in {', '.join(broken)}: `flashgate reconcile -c {config} "
            "--repair` brings their items to the order's state"
        )
    else:
        lines.append("every cart order is whole")
    return "\n".join(lines)


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


def books_json(books: Books) -> str:
    carts = [{**asdict(c), "drift": c.drift} for c in books.carts]
    return json.dumps(
        {"campaigns": _audit_documents(books.campaigns), "carts": carts, "drift": books.drift}
    )


def _audit_documents(audits: Sequence[Audit]) -> list[dict[str, Any]]:
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
    return documents
