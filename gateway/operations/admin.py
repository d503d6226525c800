"""The operators' API on the admin port: campaigns, stock, reservations, dead letters.

Every call but the health checks and the OpenAPI document needs ``Authorization:
Bearer <token>``: ``admin.token`` (every scope) or one of ``admin.tokens``, each with
its scopes, all compared in constant time. A valid token without the call's scope gets
403 ``forbidden``; the ledger records the token's name as the actor. The calls are one
table, ``ROUTES``, from which the app is built and the OpenAPI document generated.
Errors are problem+json, like on the edge.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiohttp import web

from gateway.admission.room import VIEW_TTL_MS
from gateway.config import AdminSettings, CampaignSettings, ConfigError
from gateway.config.settings import SCOPES, Scope
from gateway.core import stock
from gateway.core.campaigns import Campaign
from gateway.core.carts import Cart
from gateway.core.health import Readiness, health_handlers
from gateway.core.publisher import Publisher, RedisFigures, exposition, read_redis_figures
from gateway.core.reload import Reloader
from gateway.core.snapshot import SnapshotHolder
from gateway.core.stockwatch import StockWatch
from gateway.problems import Code, Problem, name_the_server
from limiter.carts import GONE, MoveStatus
from limiter.errors import CampaignMissing, StorageError
from limiter.keys import campaign_of
from limiter.records import (
    AdjustStatus,
    CommitStatus,
    DeadLetter,
    Figures,
    ReleaseStatus,
    Replay,
    ReplayStatus,
    Reservation,
    State,
)
from limiter.store import CampaignStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admin:
    """What the admin API needs of its process."""

    live: SnapshotHolder
    watch: StockWatch
    readiness: Readiness
    reloader: Reloader
    publisher: Publisher
    #: this process's name, and how many gateway processes are alive
    actor: str
    processes: Callable[[], int]
    #: Under ``--workers``: have every worker reload (None: this process is alone).
    reload_all: Callable[[], None] | None = None
    #: The OpenAPI document of this configuration (served at GET /openapi.json).
    describe: Callable[[], Mapping[str, Any]] | None = None


ADMIN = web.AppKey("admin", Admin)
ACTOR_HEADER = "X-Actor"
_ACTOR = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,63}$")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
#: The name admin.token goes by in the ledger.
LEGACY_NAME = "admin"
_TOKEN_NAME = web.RequestKey("token_name", str)
_CHALLENGE = 'Bearer realm="flashgate-admin"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminRoute(NamedTuple):
    """One call of the admin API: what it needs and answers, for the app and the OpenAPI
    document alike (the document names the schemas; see gateway/contract)."""

    method: str
    path: str
    handler: Handler
    #: the scope a token needs (None: public)
    scope: Scope | None
    summary: str
    #: schema names of the request body (None: no body) and of the 200 answer
    body: str | None
    answer: str
    #: the problem codes it may answer besides the ones every call may
    codes: tuple[Code, ...] = ()


def create_admin_app(admin: Admin, *, metrics_need_token: bool = False) -> web.Application:
    """The admin API; the tokens are read from the snapshot in force at each call, so a
    reload can rotate them."""
    name_the_server()
    scopes = {
        (r.method, r.path): ("metrics" if r.path == "/metrics" and metrics_need_token else r.scope)
        for r in ROUTES
    }
    scopes |= {("GET", path): None for path in health_handlers(admin.readiness)}
    app = web.Application(middlewares=[_problems, _authenticate(scopes)], client_max_size=64 * 1024)
    app[ADMIN] = admin
    for path, handler in health_handlers(admin.readiness).items():
        app.router.add_get(path, handler)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    return app


@web.middleware
async def _problems(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except Problem as problem:
        return problem.response()
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return Problem(
            Code.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed at {request.path}",
            headers={"Allow": allowed},
        ).response()
    except web.HTTPNotFound:
        return Problem(Code.NOT_FOUND, f"nothing at {request.path}").response()
    except web.HTTPRequestEntityTooLarge:
        return Problem(Code.TOO_LARGE, "the body is too large").response()
    except StorageError as exc:
        log.warning("admin %s %s: %s", request.method, request.path, exc)
        return Problem(Code.UNAVAILABLE, str(exc), headers={"Retry-After": "1"}).response()


def _authenticate(scopes: Mapping[tuple[str, str], Scope | None]) -> Any:
    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        route = request.match_info.route.resource
        template = route.canonical if route is not None else request.path
        method = "GET" if request.method == "HEAD" else request.method
        scope = scopes.get((method, template), "read" if route is not None else None)
        if route is not None and scope is not None:
            admin = request.app[ADMIN].live.current.settings.admin
            name, granted = _token(admin, request.headers.get("Authorization", ""))
            if name is None:
                raise Problem(
                    Code.UNAUTHENTICATED,
                    "a valid 'Authorization: Bearer <admin token>' is required",
                    headers={"WWW-Authenticate": _CHALLENGE},
                )
            if scope not in granted:
                raise Problem(
                    Code.FORBIDDEN,
                    f"token {name!r} lacks the {scope!r} scope this call needs",
                    headers={
                        "WWW-Authenticate": f'{_CHALLENGE}, error="insufficient_scope", '
                        f'scope="{scope}"'
                    },
                    scope=scope,
                )
            request[_TOKEN_NAME] = name
        return await handler(request)  # type: ignore[no-any-return]

    return authenticate


def _token(admin: AdminSettings | None, header: str) -> tuple[str | None, tuple[str, ...]]:
    """The name and scopes of the token in an Authorization header, or (None, ()).
    Every configured token is compared, in constant time, whichever matches."""
    scheme, _, given = header.partition(" ")
    if admin is None or scheme.lower() != "bearer":  # the scheme is case-insensitive
        return None, ()
    # surrogateescape: a header that is not UTF-8 compares (unequal), never raises
    presented = given.strip().encode("utf-8", "surrogateescape")
    candidates = [(t.name, t.token, tuple(t.scopes)) for t in admin.tokens]
    if admin.token is not None:
        candidates.append((LEGACY_NAME, admin.token, SCOPES))
    found: tuple[str | None, tuple[str, ...]] = (None, ())
    for name, secret, scopes in candidates:
        if hmac.compare_digest(presented, secret.encode()):
            found = (name, scopes)
    return found


def _campaign(request: web.Request, campaign_id: str | None = None) -> Campaign:
    campaign_id = campaign_id or request.match_info["id"]
    campaign = request.app[ADMIN].live.current.campaigns.get(campaign_id)
    if campaign is None:
        raise Problem(Code.NOT_FOUND, f"no campaign {campaign_id!r}")
    return campaign


def _actor(request: web.Request) -> str:
    """Who the ledger says did it: the token's name (admin.token: "admin", with the
    operator's X-Actor or address), and the X-Actor a named token's caller adds."""
    given = request.headers.get(ACTOR_HEADER, "")
    if given and not _ACTOR.match(given):
        raise Problem(
            Code.BAD_REQUEST, f"{ACTOR_HEADER} must be 1 to 64 printable ASCII characters"
        )
    name = request.get(_TOKEN_NAME, LEGACY_NAME)
    if name == LEGACY_NAME:
        return f"admin:{given or request.remote or 'unknown'}"
    return f"{name}:{given}" if given else str(name)


async def campaign_document(admin: Admin, campaign: Campaign) -> dict[str, Any]:
    try:
        each = await stock.shard_figures(campaign)
        decided = await stock.decided(campaign)
        moving = await stock.in_flight(campaign)
    except CampaignMissing as exc:
        raise Problem(
            Code.UNAVAILABLE, f"{exc}; the gateway creates it when Redis is reachable"
        ) from None
    document = {
        **_document(campaign, stock.total(each), moving),
        "decided": decided,
        **_process_view(admin, campaign),
        **await _waiting_room(campaign),
    }
    if campaign.sharded:
        document["shards"] = [
            {"shard": j, **f._asdict(), "balanced": f.balanced} for j, f in enumerate(each)
        ]
    return document


async def _waiting_room(campaign: Campaign) -> dict[str, Any]:
    """The queue from a view computed now (with the admission that comes with it), and
    what this process knows of its waiters."""
    room = campaign.room
    if room is None:
        return {}
    view = (await room.store.tick(VIEW_TTL_MS, force=True)).view
    return {"waiting_room": {**view.document(), "process": room.figures()}}


def _process_view(admin: Admin, campaign: Campaign) -> dict[str, Any]:
    """What this process alone knows (with --workers, each worker its own)."""
    return {
        "process": {
            "id": admin.actor,
            "local_sold_out": campaign.id in admin.watch.sold_out,
            "shadowed": dict(campaign.shaper.shadowed),
            "refused": dict(campaign.shaper.refused),
            "processes_alive": admin.processes(),
        }
    }


def _limits(settings: CampaignSettings) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for name in ("rate_limit", "client_rate_limit", "admission_ratio"):
        value = getattr(settings, name)
        if value is not None:
            limits[name] = {k: getattr(value, k) for k in value.__dataclass_fields__}
    return limits


def _document(campaign: Campaign, figures: Figures, in_flight: int = 0) -> dict[str, Any]:
    """The campaign's figures (summed over its shards: units on their way between two
    shards count as stock, and as available)."""
    s = campaign.settings
    return {
        "id": s.id,
        "route": str(s.route),
        "upstream": s.upstream,
        "stock_total": figures.stock_total + in_flight,
        "available": figures.available + in_flight,
        "reserved": figures.reserved,
        "sold": figures.sold,
        "sold_out": figures.available + in_flight == 0,
        "balanced": figures.balanced,
        "shard_count": s.shards,
        "per_user_limit": s.per_user_limit,
        "max_quantity": s.max_quantity,
        "forward": s.forward,
        "starts_at": s.starts_at.isoformat() if s.starts_at else None,
        "ends_at": s.ends_at.isoformat() if s.ends_at else None,
        "limits": _limits(s),
    }


async def list_campaigns(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    campaigns = admin.live.current.campaigns.values()
    documents = [await campaign_document(admin, c) for c in campaigns]
    return web.json_response({"campaigns": documents})


async def show_campaign(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    return web.json_response(await campaign_document(admin, _campaign(request)))


async def adjust_stock(request: web.Request) -> web.Response:
    """``{"delta": n}`` or ``{"set": n}``; atomic against buying; 409 below zero."""
    campaign = _campaign(request)
    delta, set_to = _stock_change(await _json_object(request))
    result = await stock.adjust(campaign, delta=delta, set_to=set_to, actor=_actor(request))
    if result.status is AdjustStatus.NO_CAMPAIGN:
        raise Problem(Code.UNAVAILABLE, f"campaign {campaign.id} has no counters in Redis")
    if result.status is AdjustStatus.BELOW_ZERO:
        raise Problem(
            Code.INSUFFICIENT_STOCK,
            f"available would go below zero (available is {result.figures.available})",
            available=result.figures.available,
        )
    watch = request.app[ADMIN].watch
    if result.figures.available > 0:
        watch.mark_restocked(campaign.id)
    else:
        watch.mark_sold_out(campaign.id)
    return web.json_response(_document(campaign, result.figures))


def _stock_change(body: dict[str, Any]) -> tuple[int | None, int | None]:
    given = [k for k in ("delta", "set") if k in body]
    unknown = sorted(set(body) - {"delta", "set"})
    if len(given) != 1 or unknown:
        raise Problem(Code.BAD_REQUEST, 'the body must be exactly {"delta": n} or {"set": n}')
    value = body[given[0]]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Problem(Code.BAD_REQUEST, f"{given[0]} must be an integer, got {json.dumps(value)}")
    if abs(value) > 10**12:
        raise Problem(Code.BAD_REQUEST, f"{given[0]} is out of range")
    # a negative set is a change below zero: 409 like a delta too large, from the script
    return (None, value) if given[0] == "set" else (value, None)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    # LookupError: an unknown charset; RecursionError: [[[[... nested too deep
    except (ValueError, LookupError, RecursionError) as exc:
        raise Problem(Code.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Problem(Code.BAD_REQUEST, "the body must be a JSON object")
    return body


async def _reservation(request: web.Request) -> tuple[Campaign, CampaignStore, Reservation]:
    """The campaign, the store of the shard the reservation lives in, and its record."""
    reservation_id = request.match_info["id"]
    campaign_id = campaign_of(reservation_id)
    if campaign_id is None:
        raise Problem(Code.NOT_FOUND, f"{reservation_id!r} is not a reservation id")
    campaign = _campaign(request, campaign_id)
    shard = campaign.shard_for(reservation_id)
    record = await shard.store.reservation(reservation_id) if shard else None
    if shard is None or record is None:
        raise Problem(Code.NOT_FOUND, f"no reservation {reservation_id}")
    return campaign, shard.store, record


def _cart_order(request: web.Request, order_id: str | None = None) -> tuple[Cart, str] | None:
    """The cart and the order, when the id is a cart order's (None: it is not)."""
    order_id = order_id or request.match_info["id"]
    cart = request.app[ADMIN].live.current.carts.get(campaign_of(order_id) or "")
    return (cart, order_id) if cart is not None else None


async def _order_document(cart: Cart, order_id: str, **extra: Any) -> dict[str, Any]:
    order = await cart.store.reservation(order_id)
    if order is None:
        raise Problem(Code.NOT_FOUND, f"no reservation {order_id}")
    return {**order.public(), "items": await cart.items_now(order), **extra}


async def show_reservation(request: web.Request) -> web.Response:
    """One reservation, or one cart order with each item's state (an item of a cart
    names its order: ``cart_order``)."""
    if (order := _cart_order(request)) is not None:
        return web.json_response(await _order_document(*order))
    _, _, record = await _reservation(request)
    return web.json_response(record.public())


async def _whole_order(request: web.Request) -> tuple[Cart, str] | None:
    """The cart order a cancel or confirm acts on: the id's own, or the order an item
    of a cart belongs to (an order is cancelled and confirmed whole)."""
    if (order := _cart_order(request)) is not None:
        return order
    _, _, record = await _reservation(request)
    if not record.cart_order:
        return None
    found = _cart_order(request, record.cart_order)
    if found is None:
        raise Problem(
            Code.NOT_FOUND,
            f"reservation {record.id} belongs to cart order {record.cart_order}, whose cart "
            "is not configured",
        )
    return found


async def cancel_reservation(request: web.Request) -> web.Response:
    """Give the units and the user's quota back; a second cancel changes nothing. A cart
    order is cancelled whole (also when one of its items is named)."""
    if (whole := await _whole_order(request)) is not None:
        cart, order_id = whole
        result = await cart.settle.cancel(order_id, _actor(request))
        if result.status is MoveStatus.NOT_FOUND:
            raise Problem(Code.NOT_FOUND, f"no reservation {order_id}")
        if result.status is MoveStatus.MOVED:
            for campaign_id in cart.campaigns:
                request.app[ADMIN].watch.mark_restocked(campaign_id)
        moved = result.status is MoveStatus.MOVED
        return web.json_response(await _order_document(cart, order_id, released_now=moved))
    campaign, store, record = await _reservation(request)
    result = await store.release(
        record.id,
        leavable=(State.RESERVED, State.HELD, State.COMMITTED),
        target=State.CANCELLED,
        reason="cancelled by an operator",
        actor=_actor(request),
    )
    if result.status is ReleaseStatus.RELEASED:
        request.app[ADMIN].watch.mark_restocked(campaign.id)
    updated = await store.reservation(record.id)
    document = (updated or record).public()
    return web.json_response({**document, "released_now": result.status is ReleaseStatus.RELEASED})


async def confirm_reservation(request: web.Request) -> web.Response:
    """The backend says a held order was paid: the sale is final. Idempotent; 409
    ``expired`` when the hold ran out first (the backend must then cancel its order). A
    cart order is confirmed whole (also when one of its items is named)."""
    if (whole := await _whole_order(request)) is not None:
        return await _confirm_order(request, *whole)
    _, store, record = await _reservation(request)
    actor = _actor(request)
    # A hold past its deadline expires now, even if no sweeper has come by yet.
    await store.release(
        record.id,
        leavable=(State.HELD,),
        target=State.EXPIRED,
        reason="deadline passed",
        actor=actor,
        only_when_due=True,
    )
    result = await store.commit(
        record.id, target=State.COMMITTED, retake=False, actor=actor, leavable=State.HELD
    )
    if result.status is CommitStatus.NOT_ALLOWED:
        raise Problem(
            Code.NOT_HELD,
            f"reservation {record.id} is {result.state}: only a held order (one the backend "
            "accepted with on_success: hold) can be confirmed",
            reservation_id=record.id,
            state=result.state,
        )
    if result.status is CommitStatus.GONE:
        raise Problem(
            Code.EXPIRED,
            f"reservation {record.id} went back to stock ({result.state}) before this confirm; "
            "the order must not be fulfilled",
            reservation_id=record.id,
            state=result.state,
        )
    updated = await store.reservation(record.id)
    document = (updated or record).public()
    return web.json_response({**document, "confirmed_now": result.status is CommitStatus.DONE})


async def _confirm_order(request: web.Request, cart: Cart, order_id: str) -> web.Response:
    result = await cart.settle.confirm(order_id, _actor(request))
    if result.status is MoveStatus.NOT_FOUND:
        raise Problem(Code.NOT_FOUND, f"no reservation {order_id}")
    gone = result.status is MoveStatus.HOLD_RAN_OUT or result.state in _GONE_STATES
    if result.status is MoveStatus.NOT_ALLOWED and not gone:
        raise Problem(
            Code.NOT_HELD,
            f"cart order {order_id} is {result.state}: only a held order (one the backend "
            "accepted with on_success: hold) can be confirmed",
            reservation_id=order_id,
            state=result.state,
        )
    if gone:
        raise Problem(
            Code.EXPIRED,
            f"cart order {order_id} went back to stock ({result.state}) before this confirm; "
            "the order must not be fulfilled",
            reservation_id=order_id,
            state=result.state,
        )
    confirmed = result.status is MoveStatus.MOVED
    return web.json_response(await _order_document(cart, order_id, confirmed_now=confirmed))


_GONE_STATES = frozenset(state.value for state in GONE)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition: every worker's counters, and figures read from Redis now."""
    admin = request.app[ADMIN]
    figures = RedisFigures()
    try:
        campaigns = admin.live.current.campaigns.values()
        figures = await read_redis_figures(admin.publisher.pipe, campaigns, admin.processes())
    except StorageError as exc:
        log.warning("metrics without Redis figures: %s", exc)
    admin.publisher.flush()
    body, content_type = exposition(figures)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def reload_config(request: web.Request) -> web.Response:
    """Re-read the config file: 200 with what changed; 422 ``invalid-config`` naming
    every problem (the running config stays). Under ``--workers`` every worker reloads
    (202), and the file is also checked here so that a refusal is answered (422)."""
    admin = request.app[ADMIN]
    path = admin.reloader.path
    if path is None:
        raise Problem(Code.NOT_FOUND, "this gateway was not started from a file")
    try:
        if admin.reload_all is not None:
            # Every worker reloads, a refused file included: each then refuses it too,
            # logs why, counts it and shows it on /readyz, as after a SIGHUP.
            admin.reload_all()
            admin.reloader.check(path)
            return web.json_response({"status": "reloading", "scope": "every worker"}, status=202)
        result = await admin.reloader.reload()
    except ConfigError as exc:
        raise Problem(
            Code.INVALID_CONFIG,
            f"{path} was not applied; the running configuration stays",
            problems=exc.lines(),
        ) from None
    return web.json_response({"status": "reloaded", **result.summary()})


async def list_dead_letters(request: web.Request) -> web.Response:
    """The campaign's dead letters, oldest first (``?count=`` up to 1000, ``?after=`` an id)."""
    campaign = _campaign(request)
    count = _count(request.query.get("count", "100"))
    after = request.query.get("after", "")
    if after and not _stream_id(after):
        raise Problem(Code.BAD_REQUEST, "after must be a dead letter id like 1700000000000-0")
    letters = await _dead_letters(campaign, count, after)
    return web.json_response(
        {"campaign": campaign.id, "dead_letters": [_letter(d) for d in letters]}
    )


_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def _stream_id(text: str) -> bool:
    """A Redis stream id: two numbers of 64 bits at most (Redis refuses any other)."""
    match = _STREAM_ID.fullmatch(text)
    return match is not None and all(int(part) < 2**64 for part in match.groups())


#: Dead letters one replay call takes at most.
MAX_REPLAY = 1000


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLAY:
        raise Problem(Code.BAD_REQUEST, f"count must be a whole number from 1 to {MAX_REPLAY}")
    return int(text)


def _letter(letter: DeadLetter) -> dict[str, Any]:
    try:
        order = json.loads(letter.payload)
        summary: dict[str, Any] | None = {"method": order["method"], "path": order["path"]}
    except (ValueError, KeyError, TypeError):
        summary = None
    return {
        "id": letter.id,
        "reservation_id": letter.reservation_id,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "order": summary,
    }


async def replay_dead_letters(request: web.Request) -> web.Response:
    """``{"ids": [...]}`` (or no body: the oldest up to 1000): each takes its stock again
    and its order is delivered anew, or the answer says why it cannot."""
    campaign = _campaign(request)
    body = await _json_object(request) if request.can_read_body else {}
    ids = body.get("ids")
    if ids is None:
        ids = [d.id for d in await _dead_letters(campaign, MAX_REPLAY)]
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_REPLAY
        or not all(isinstance(i, str) and _stream_id(i) for i in ids)
    ):
        raise Problem(
            Code.BAD_REQUEST, f"ids must be a list of at most {MAX_REPLAY} dead letter ids"
        )
    actor = _actor(request)
    replayed, refused = [], []
    for entry_id in ids:
        result = await _replay(campaign, entry_id, actor)
        if result.status is ReplayStatus.REPLAYED:
            replayed.append(entry_id)
        else:
            refused.append({"id": entry_id, "reason": result.reason})
    return web.json_response({"campaign": campaign.id, "replayed": replayed, "refused": refused})


async def _dead_letters(campaign: Campaign, count: int, after: str = "") -> list[DeadLetter]:
    """Every shard's dead letters, oldest first (their ids are stream ids: times)."""
    found = [d for shard in campaign.shards for d in await shard.store.dead_letters(count, after)]
    return sorted(found, key=lambda d: tuple(int(part) for part in d.id.split("-")))[:count]


async def _replay(campaign: Campaign, entry_id: str, actor: str) -> Replay:
    """Replay a dead letter from whichever shard holds it."""
    result = Replay(ReplayStatus.NO_LETTER, f"no dead letter {entry_id}")
    for shard in campaign.shards:
        result = await shard.store.replay_dead_letter(entry_id, actor)
        if result.status is not ReplayStatus.NO_LETTER:
            return result
    return result


async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI document of the configuration in force (GET /openapi.json)."""
    describe = request.app[ADMIN].describe
    if describe is None:
        raise Problem(Code.NOT_FOUND, "this gateway serves no OpenAPI document")
    return web.json_response(describe())


_RESERVATION = (Code.NOT_FOUND, Code.UNAVAILABLE)
#: Every call of the admin API (the health checks are added from gateway.core.health).
ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute("GET", "/openapi.json", openapi_document, None, "This document", None, "OpenAPI"),
    AdminRoute("GET", "/metrics", metrics, None, "Prometheus metrics", None, "Metrics"),
    AdminRoute(
        "GET",
        "/campaigns",
        list_campaigns,
        "read",
        "Every campaign",
        None,
        "CampaignList",
        (Code.UNAVAILABLE,),
    ),
    AdminRoute(
        "GET",
        "/campaigns/{id}",
        show_campaign,
        "read",
        "One campaign and its counters",
        None,
        "Campaign",
        (Code.NOT_FOUND, Code.UNAVAILABLE),
    ),
    AdminRoute(
        "POST",
        "/campaigns/{id}/stock",
        adjust_stock,
        "stock",
        "Change stock by a delta or set what is available",
        "StockChange",
        "CampaignSettings",
        (
            Code.BAD_REQUEST,
            Code.NOT_FOUND,
            Code.INSUFFICIENT_STOCK,
            Code.TOO_LARGE,
            Code.UNAVAILABLE,
        ),
    ),
    AdminRoute(
        "GET",
        "/campaigns/{id}/dead-letters",
        list_dead_letters,
        "read",
        "Orders the dispatcher gave up on",
        None,
        "DeadLetters",
        (Code.BAD_REQUEST, Code.NOT_FOUND, Code.UNAVAILABLE),
    ),
    AdminRoute(
        "POST",
        "/campaigns/{id}/dead-letters/replay",
        replay_dead_letters,
        "reservations",
        "Deliver dead letters again, taking their stock again",
        "Replay",
        "Replayed",
        (Code.BAD_REQUEST, Code.NOT_FOUND, Code.TOO_LARGE, Code.UNAVAILABLE),
    ),
    AdminRoute(
        "GET",
        "/reservations/{id}",
        show_reservation,
        "reservations",
        "One reservation",
        None,
        "Reservation",
        _RESERVATION,
    ),
    AdminRoute(
        "POST",
        "/reservations/{id}/cancel",
        cancel_reservation,
        "reservations",
        "Give a reservation's units and quota back (also of a sale)",
        None,
        "Cancelled",
        (*_RESERVATION, Code.BAD_REQUEST),
    ),
    AdminRoute(
        "POST",
        "/reservations/{id}/confirm",
        confirm_reservation,
        "confirm",
        "A held order was paid: the sale is final",
        None,
        "Confirmed",
        (*_RESERVATION, Code.BAD_REQUEST, Code.EXPIRED, Code.NOT_HELD),
    ),
    AdminRoute(
        "POST",
        "/reload",
        reload_config,
        "reload",
        "Re-read the configuration file",
        None,
        "Reloaded",
        (Code.NOT_FOUND, Code.INVALID_CONFIG),
    ),
)
