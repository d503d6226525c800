"""What the edge answers a buyer, whatever was bought: the answer record, the 202 of
queue mode, the backend's answer relayed, and the 503 of a Redis that could not decide."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

from aiohttp import web

from gateway.forwarding.upstream import UpstreamReply
from gateway.headers import VIA
from gateway.problems import Code, Problem, retry_after
from limiter.errors import StorageError
from limiter.logs import Throttled

log = logging.getLogger(__name__)
throttled = Throttled(log)

RESERVATION_HEADER = "X-Reservation-Id"
REPLAYED_HEADER = "Idempotent-Replayed"

#: A decided request's outcome code (a problem code, or one of ``ok``, ``queued``,
#: ``replayed``, ``upstream-refused``) and the response.
Decided = tuple[str, web.StreamResponse]


class Answer(NamedTuple):
    """What the edge answered, for the metrics and the access log."""

    code: str
    response: web.StreamResponse
    user: str = ""
    #: Answered from memory (sale window, sold-out flag): the flood at peak.
    local: bool = False


def redis_failed(what: str, jitter: float, exc: StorageError, detail: str) -> Decided:
    """503 when Redis could not decide (``what``: the campaign or cart, for the log)."""
    throttled.log(logging.WARNING, f"redis:{what}", "%s: %s", what, exc)
    return unavailable(detail, jitter)


def unavailable(detail: str, jitter: float) -> Decided:
    problem = Problem(Code.UNAVAILABLE, detail, headers={"Retry-After": retry_after(1, jitter)})
    return problem.code.value, problem.response()


def via(request: web.BaseRequest) -> str:
    """Via (RFC 9110 7.6.3): the hops before this one, then this gateway."""
    before = ", ".join(request.headers.getall("Via", []))
    return f"{before}, {VIA}" if before else VIA


def queued(
    rid: str, state: str, replayed: bool = False, headers: Mapping[str, str] | None = None
) -> web.Response:
    """202: the order waits in the queue; the buyer polls status_url (``state``: the
    reservation's or the cart order's)."""
    status_url = f"/reservations/{rid}"
    sent = {RESERVATION_HEADER: rid, "Location": status_url, **(headers or {})}
    if replayed:
        sent[REPLAYED_HEADER] = "true"
    document = {"reservation_id": rid, "status_url": status_url, "state": str(state)}
    return web.json_response(document, status=202, headers=sent)


def relay(reply: UpstreamReply, rid: str, replayed: bool = False) -> web.Response:
    headers = reply.headers.copy()
    headers.popall("Content-Length", None)
    headers[RESERVATION_HEADER] = rid
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return web.Response(status=reply.status, headers=headers, body=reply.body)
