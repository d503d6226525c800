"""The operators' API on the admin port: campaigns, stock, reservations.

Every call but the health checks needs ``Authorization: Bearer <admin.token>``,
compared in constant time. Errors are problem+json, like on the edge.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.config import CampaignSettings, ConfigError
from gateway.core.campaigns import Campaign
from gateway.core.health import Readiness, health_handlers
from gateway.core.publisher import Publisher, RedisFigures, exposition, read_redis_figures
from gateway.core.reload import Reloader
from gateway.core.snapshot import SnapshotHolder
from gateway.core.stockwatch import StockWatch
from gateway.problems import Code, Problem
from limiter.errors import CampaignMissing, StorageError
from limiter.keys import campaign_of
from limiter.records import (
    AdjustStatus,
    CommitStatus,
    Figures,
    ReleaseStatus,
    Reservation,
    State,
)

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


ADMIN = web.AppKey("admin", Admin)
ACTOR_HEADER = "X-Actor"
_ACTOR = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,63}$")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_admin_app(admin: Admin, *, metrics_need_token: bool = False) -> web.Application:
    """The admin API; the token is read from the snapshot in force at each call, so a
    reload can rotate it."""
    public = PUBLIC_PATHS - ({"/metrics"} if metrics_need_token else set())
    app = web.Application(middlewares=[_problems, _authenticate(public)], client_max_size=64 * 1024)
    app[ADMIN] = admin
    for path, handler in health_handlers(admin.readiness).items():
        app.router.add_get(path, handler)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/campaigns", list_campaigns)
    app.router.add_get("/campaigns/{id}", show_campaign)
    app.router.add_post("/campaigns/{id}/stock", adjust_stock)
    app.router.add_get("/reservations/{id}", show_reservation)
    app.router.add_post("/reservations/{id}/cancel", cancel_reservation)
    app.router.add_post("/reservations/{id}/confirm", confirm_reservation)
    app.router.add_post("/reload", reload_config)
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


def _authenticate(public: frozenset[str]) -> Any:
    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in public:
            admin = request.app[ADMIN].live.current.settings.admin
            expected = (admin.token if admin else "").encode()
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # surrogateescape: a header that is not UTF-8 compares (unequal), never raises
            given = token.strip().encode("utf-8", "surrogateescape")
            if (
                admin is None
                or scheme.lower() != "bearer"  # the scheme is case-insensitive (RFC 9110)
                or not hmac.compare_digest(given, expected)
            ):
                raise Problem(
                    Code.UNAUTHENTICATED,
                    "a valid 'Authorization: Bearer <admin token>' is required",
                    headers={"WWW-Authenticate": 'Bearer realm="flashgate-admin"'},
                )
        return await handler(request)  # type: ignore[no-any-return]

    return authenticate


def _campaign(request: web.Request, campaign_id: str | None = None) -> Campaign:
    campaign_id = campaign_id or request.match_info["id"]
    campaign = request.app[ADMIN].live.current.campaigns.get(campaign_id)
    if campaign is None:
        raise Problem(Code.NOT_FOUND, f"no campaign {campaign_id!r}")
    return campaign


def _actor(request: web.Request) -> str:
    given = request.headers.get(ACTOR_HEADER, "")
    if given and not _ACTOR.match(given):
        raise Problem(
            Code.BAD_REQUEST, f"{ACTOR_HEADER} must be 1 to 64 printable ASCII characters"
        )
    return f"admin:{given or request.remote or 'unknown'}"


async def campaign_document(admin: Admin, campaign: Campaign) -> dict[str, Any]:
    try:
        figures = await campaign.store.figures()
        decided = await campaign.store.decided()
    except CampaignMissing as exc:
        raise Problem(
            Code.UNAVAILABLE, f"{exc}; the gateway creates it when Redis is reachable"
        ) from None
    return {**_document(campaign, figures), "decided": decided, **_process_view(admin, campaign)}


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


def _document(campaign: Campaign, figures: Figures) -> dict[str, Any]:
    s = campaign.settings
    return {
        "id": s.id,
        "route": str(s.route),
        "upstream": s.upstream,
        "stock_total": figures.stock_total,
        "available": figures.available,
        "reserved": figures.reserved,
        "sold": figures.sold,
        "sold_out": figures.available == 0,
        "balanced": figures.balanced,
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
    result = await campaign.store.adjust(delta=delta, set_to=set_to, actor=_actor(request))
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


async def _reservation(request: web.Request) -> tuple[Campaign, Reservation]:
    reservation_id = request.match_info["id"]
    campaign_id = campaign_of(reservation_id)
    if campaign_id is None:
        raise Problem(Code.NOT_FOUND, f"{reservation_id!r} is not a reservation id")
    campaign = _campaign(request, campaign_id)
    record = await campaign.store.reservation(reservation_id)
    if record is None:
        raise Problem(Code.NOT_FOUND, f"no reservation {reservation_id}")
    return campaign, record


async def show_reservation(request: web.Request) -> web.Response:
    _, record = await _reservation(request)
    return web.json_response(record.public())


async def cancel_reservation(request: web.Request) -> web.Response:
    """Give the units and the user's quota back; a second cancel changes nothing."""
    campaign, record = await _reservation(request)
    result = await campaign.store.release(
        record.id,
        leavable=(State.RESERVED, State.HELD, State.COMMITTED),
        target=State.CANCELLED,
        reason="cancelled by an operator",
        actor=_actor(request),
    )
    if result.status is ReleaseStatus.RELEASED:
        request.app[ADMIN].watch.mark_restocked(campaign.id)
    updated = await campaign.store.reservation(record.id)
    document = (updated or record).public()
    return web.json_response({**document, "released_now": result.status is ReleaseStatus.RELEASED})


async def confirm_reservation(request: web.Request) -> web.Response:
    """The backend says a held order was paid: the sale is final. Idempotent; 409
    ``expired`` when the hold ran out first (the backend must then cancel its order)."""
    campaign, record = await _reservation(request)
    actor = _actor(request)
    # A hold past its deadline expires now, even if no sweeper has come by yet.
    await campaign.store.release(
        record.id,
        leavable=(State.HELD,),
        target=State.EXPIRED,
        reason="deadline passed",
        actor=actor,
        only_when_due=True,
    )
    result = await campaign.store.commit(
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
    updated = await campaign.store.reservation(record.id)
    document = (updated or record).public()
    return web.json_response({**document, "confirmed_now": result.status is CommitStatus.DONE})


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
