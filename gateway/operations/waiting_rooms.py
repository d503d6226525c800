"""The waiting rooms in ``flashgate status``: each campaign's queue as it is now (the
view is computed here, and the room moves on with it, as at any gateway's call)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.admission.room import VIEW_TTL_MS
from gateway.config import CampaignSettings, Settings
from gateway.core.campaigns import queue_store_for
from gateway.operations.terminal import table
from limiter.store import CampaignStore

COLUMNS = (
    ("campaign", "id"),
    ("waiting", "waiting"),
    ("passes out", "passes_outstanding"),
    ("cap", "passes_cap"),
    ("issued", "passes_issued"),
    ("used", "passes_used"),
    ("expired", "passes_expired"),
    ("withdrawn", "passes_withdrawn"),
    ("closed", "closed"),
    ("abandoned", "abandoned"),
    ("admitting", "admitting"),
)


async def waiting_room(
    settings: Settings, campaign: CampaignSettings, store: CampaignStore
) -> dict[str, Any] | None:
    """The queue's figures (None: the campaign has no waiting room, or no counters)."""
    queue = queue_store_for(settings, campaign, store.pipe, store.scripts)
    if queue is None:
        return None
    view = (await queue.tick(VIEW_TTL_MS, force=True)).view
    return None if view.missing else view.document()


def render_waiting_rooms(rows: Sequence[dict[str, Any]]) -> str:
    """A second table, for the campaigns with a waiting room ("" when none has one)."""
    rooms = [{"id": r["id"], **r["waiting_room"]} for r in rows if r.get("waiting_room")]
    if not rooms:
        return ""
    lines = [tuple(room[key] for _, key in COLUMNS) for room in rooms]
    return "\n\nwaiting rooms\n" + table([title for title, _ in COLUMNS], lines)
