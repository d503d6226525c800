"""``GET /reservations/{id}`` on the gateway port: a buyer polls their own reservation
(queue mode answers 202 and points here), and only their own: anyone else's is
"not found", so ids cannot be probed."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.core.snapshot import Snapshot
from gateway.problems import Code, Problem, retry_after
from limiter.errors import StorageError
from limiter.keys import campaign_of
from limiter.records import Reservation

PREFIX = "/reservations/"


async def reservation_status(snapshot: Snapshot, request: web.BaseRequest) -> web.Response:
    try:
        user = snapshot.identity(request)
        rid = request.path.removeprefix(PREFIX)
        campaign = snapshot.campaigns.get(campaign_of(rid) or "")
        record = await campaign.store.reservation(rid) if campaign else None
        if record is None or record.user_id != user:
            raise Problem(Code.NOT_FOUND, f"you have no reservation {rid}")
    except Problem as problem:
        return problem.response()
    except StorageError:
        return Problem(
            Code.UNAVAILABLE,
            "redis did not answer; try again",
            headers={"Retry-After": retry_after(1, snapshot.settings.gateway.retry_after_jitter)},
        ).response()
    return web.json_response(buyer_document(record))


def buyer_document(record: Reservation) -> dict[str, Any]:
    document: dict[str, Any] = {
        "reservation_id": record.id,
        "campaign": record.campaign_id,
        "state": record.state.value,
        "quantity": record.quantity,
        "created_ms": record.created_ms,
        "updated_ms": record.updated_ms,
        "reason": record.reason or None,
    }
    if record.reply is not None:
        document["reply"] = {
            "status": record.reply.status,
            "content_type": record.reply.content_type,
            "body": record.reply.body.decode(errors="replace"),
        }
    return document
