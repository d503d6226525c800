"""The waiting room's buyer API on the gateway port, identity required as for buying:

* ``GET /queue/{campaign}/challenge``: a proof-of-work challenge (when the room asks one);
* ``POST /queue/{campaign}``: join (202 with a ticket), or ask again for one's place;
* ``GET /queue/{campaign}?ticket=T``: the state, position, estimated wait and when to poll
  again; once admitted, the pass to buy with (``X-Queue-Pass``);
* ``GET /queue/{campaign}/page``: a small page that does all of that in a browser.

Joining (and its challenge) is open from ``opens_before`` before ``starts_at`` until
``ends_at`` (the gateway's clock, as for the sale window), and answers sold-out while the
campaign is. Answers are never cached (``Cache-Control: no-store``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import math
import re
import time
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web

from gateway.admission.identity import JwtIdentity
from gateway.admission.room import WaitingRoom
from gateway.core.campaigns import Campaign
from gateway.core.snapshot import Snapshot
from gateway.problems import Code, Problem, retry_after
from limiter.errors import StorageError

#: A join's body is a challenge and a nonce: a few hundred bytes.
MAX_JOIN_BODY = 4096
NO_STORE = {"Cache-Control": "no-store"}


async def queue_request(
    snapshot: Snapshot, campaign: Campaign, endpoint: str, request: web.BaseRequest
) -> web.StreamResponse:
    """One request to a waiting room's path (see the module's docstring)."""
    room = campaign.room
    assert room is not None
    allowed = ("GET", "HEAD", "POST") if endpoint == "queue" else ("GET", "HEAD")
    if request.method not in allowed:
        return Problem(
            Code.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed at {request.path}; use {', '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)},
        ).response()
    if endpoint == "page":
        return page(snapshot, campaign)
    try:
        user = snapshot.identity(request)
        if endpoint == "challenge":
            _open_for_joining(campaign, room)
            return _json(room.challenge(user))
        if request.method == "POST":
            return await _join(campaign, room, user, request, snapshot)
        token = request.query.get("ticket", "")
        if not token:
            raise Problem(Code.BAD_REQUEST, "poll with ?ticket=<the ticket the join gave>")
        answer = await room.poll(user, token)
        return _json(answer.document())
    except Problem as problem:
        return problem.response()
    except StorageError:
        jitter = snapshot.settings.gateway.retry_after_jitter
        return Problem(
            Code.UNAVAILABLE,
            "redis did not answer; try again",
            headers={"Retry-After": retry_after(1, jitter)},
        ).response()


async def _join(
    campaign: Campaign,
    room: WaitingRoom,
    user: str,
    request: web.BaseRequest,
    snapshot: Snapshot,
) -> web.Response:
    _open_for_joining(campaign, room)
    body = await _join_body(request, snapshot.settings.gateway.body_timeout)
    answer, ticket = await room.join(user, body)
    poll_url = f"{room.join_path}?ticket={ticket}"
    document = {"ticket": ticket, **answer.document(), "poll_url": poll_url}
    return _json(document, status=202, headers={"Location": poll_url})


def _open_for_joining(campaign: Campaign, room: WaitingRoom) -> None:
    """403 not-started before the queue opens, 403 ended after the sale; sold-out while
    nothing is left."""
    now = time.time()
    if room.opens_ms and now * 1000 < room.opens_ms:
        opens = datetime.fromtimestamp(room.opens_ms / 1000, UTC).isoformat()
        raise Problem(
            Code.NOT_STARTED,
            f"the waiting room opens at {opens}",
            headers={"Retry-After": str(max(1, math.ceil(room.opens_ms / 1000 - now)))},
            opens_at=opens,
        )
    ended = campaign.shaper.window(now)
    if ended is not None and ended.code is Code.ENDED:
        raise ended
    if room.sold_out():
        raise Problem(Code.SOLD_OUT, f"campaign {campaign.id} is sold out", campaign=campaign.id)


async def _join_body(request: web.BaseRequest, deadline: float) -> Any:
    if request.content_length is not None and request.content_length > MAX_JOIN_BODY:
        raise Problem(Code.TOO_LARGE, f"a join's body is at most {MAX_JOIN_BODY} bytes")
    try:
        async with asyncio.timeout(deadline):
            body = await request.content.read(MAX_JOIN_BODY + 1)
    except TimeoutError:
        raise Problem(
            Code.REQUEST_TIMEOUT, f"the body did not arrive within {deadline:g}s"
        ) from None
    except (ConnectionError, web.RequestPayloadError) as exc:
        raise Problem(Code.BAD_REQUEST, f"the body could not be read: {exc}") from None
    if len(body) > MAX_JOIN_BODY:
        raise Problem(Code.TOO_LARGE, f"a join's body is at most {MAX_JOIN_BODY} bytes")
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Problem(Code.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


def _json(
    document: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(document, status=status, headers={**NO_STORE, **(headers or {})})


# --- the page


def _template() -> str:
    return (resources.files("gateway.edge") / "queue_page.html").read_text(encoding="utf-8")


_TEMPLATE = _template()


def _hashes(tag: str) -> list[str]:
    """CSP hashes of the template's inline ``tag`` elements that run (not its JSON data)."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", _TEMPLATE, flags=re.DOTALL)
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(t.encode()).digest()).decode()}'" for t in found
    ]


#: Only this page's own script and style run; it talks to this origin only.
CSP = (
    f"default-src 'none'; script-src {' '.join(_hashes('script'))}; "
    f"style-src {' '.join(_hashes('style'))}; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


def page(snapshot: Snapshot, campaign: Campaign) -> web.Response:
    """The browser page: it solves the challenge, joins, shows position and wait, polls
    as told, and buys with the pass (or hands over to ``shop_url``)."""
    room = campaign.room
    assert room is not None
    route = campaign.settings.route
    jwt_identity = isinstance(snapshot.identity, JwtIdentity)
    config = {
        "campaign": campaign.id,
        "queue_url": room.join_path,
        "challenge_url": f"{room.join_path}/challenge",
        "proof_of_work": room.settings.proof_of_work is not None,
        "buy_method": route.method,
        "buy_path": route.path,
        "shop_url": room.settings.shop_url,
        "identity_header": None if jwt_identity else snapshot.settings.identity.header,
    }
    # "<" escaped: no text in the data block can close it
    data = json.dumps(config).replace("<", "\\u003c")
    text = _TEMPLATE.replace("{{CONFIG}}", data).replace("{{TITLE}}", html.escape(campaign.id))
    headers = {
        **NO_STORE,
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return web.Response(text=text, content_type="text/html", charset="utf-8", headers=headers)
