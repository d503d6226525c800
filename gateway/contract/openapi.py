"""The OpenAPI 3.1 document of one configuration: ``flashgate openapi -c FILE`` prints it
and the admin port serves it at ``GET /openapi.json``.

It is generated from what defines the gateway's behaviour, never written by hand: the
campaigns of the configuration (their routes, limits, modes, identity), the edge's fixed
paths, the admin API's route table (``gateway.operations.admin.ROUTES``, with each call's
scope), and the problem codes with their statuses (``gateway.problems``). The order the
gateway forwards to the shop's backend is a ``webhooks`` entry.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from gateway.config import CampaignSettings, CartSettings, Settings
from gateway.contract.carts import EITHER, cart_body, cart_schemas, reservation_or_order
from gateway.contract.schemas import schemas
from gateway.contract.waiting_room import PASS_CODES, pass_parameter, queue_schemas
from gateway.core.health import HEALTH_PATHS
from gateway.edge.buyer import IDEMPOTENCY_HEADER
from gateway.edge.reservations import PREFIX as RESERVATIONS
from gateway.headers import PRODUCT
from gateway.operations.admin import ROUTES, AdminRoute
from gateway.problems import STATUS, Code
from gateway.stats import VERSION

Document = dict[str, Any]
PROBLEM = "application/problem+json"

#: What any purchase may be answered besides its campaign's own refusals.
PURCHASE_CODES = (
    Code.BAD_REQUEST,
    Code.IDEMPOTENCY_KEY_REQUIRED,
    Code.UNAUTHENTICATED,
    Code.NOT_STARTED,
    Code.ENDED,
    Code.LIMIT_EXCEEDED,
    Code.REQUEST_TIMEOUT,
    Code.DUPLICATE,
    Code.SOLD_OUT,
    Code.INSUFFICIENT_STOCK,
    Code.TOO_LARGE,
    Code.IDEMPOTENCY_KEY_MISMATCH,
    Code.RATE_LIMITED,
    Code.TOO_MANY_CONNECTIONS,
    Code.INTERNAL,
    Code.UPSTREAM_FAILED,
    Code.UNAVAILABLE,
    Code.UPSTREAM_TIMEOUT,
)
BUYER_RESERVATION_CODES = (Code.UNAUTHENTICATED, Code.NOT_FOUND, Code.UNAVAILABLE)
#: Every admin call that needs a token may be told these.
TOKEN_CODES = (Code.UNAUTHENTICATED, Code.FORBIDDEN)
#: The bare form (no quote first, no space at either end: HTTP trims it) or a string.
_KEY = r'^([\x21\x23-\x7e]([\x20-\x7e]{0,126}[\x21-\x7e])?|"[\x20\x21\x23-\x5b\x5d-\x7e]{1,128}")$'
RESERVATION_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[0-9a-f]{20}$"

_HEADERS = {
    "X-Reservation-Id": "The reservation this answer is about: the backend's idempotency key.",
    "Idempotent-Replayed": "true when this is the stored answer to an earlier request.",
    "Retry-After": "Seconds to wait before trying again (spread by a jitter).",
    "RateLimit-Policy": "The campaign's buckets (IETF httpapi draft): quota q per w seconds.",
    "RateLimit": "What is left of each bucket (r) and when it is whole again (t, seconds).",
    "X-Reservation-Items": "A cart order's items: campaign=reservation:quantity, comma separated.",
}


def document(settings: Settings) -> Document:
    """The whole document for ``settings``."""
    doc: Document = {
        "openapi": "3.1.0",
        "info": {
            "title": f"{PRODUCT} flash-sale gateway",
            "version": VERSION,
            "description": "Every purchase is decided by one atomic Redis script; winners are "
            "forwarded to the shop's backend (the `order` webhook). Refusals are RFC 9457 "
            "problem details whose `code` is listed in the Problem schema.",
        },
        "servers": [_server(settings.gateway.host, settings.gateway.port, "buyers")],
        "paths": {},
        "webhooks": {"order": _order_webhook(settings)},
        "components": {
            "schemas": {**schemas(), **queue_schemas(), **cart_schemas()},
            "headers": {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in _HEADERS.items()
            },
            "securitySchemes": _security(),
        },
    }
    paths: dict[str, Any] = doc["paths"]
    for campaign in settings.campaigns:
        item = paths.setdefault(campaign.route.path, {})
        item[campaign.route.method.lower()] = _purchase(settings, campaign)
        if campaign.waiting_room is not None:
            paths.update(_queue(settings, campaign))
    for cart in settings.carts:
        item = paths.setdefault(cart.route.path, {})
        item[cart.route.method.lower()] = _cart_purchase(settings, cart)
    paths[RESERVATIONS + "{id}"] = {"get": _buyer_reservation(settings)}
    admin = [_server(settings.admin.host, settings.admin.port, "admin")] if settings.admin else []
    for path in HEALTH_PATHS:
        paths[path] = {"servers": doc["servers"] + admin, "get": _health(path)}
    if settings.admin is not None:
        for route in ROUTES:
            item = paths.setdefault(_openapi_path(route.path), {"servers": admin})
            method = route.method.lower()
            if method in item:
                # the same method and path on the gateway port (a buyer's own reservation):
                # one path item holds one of them, so the buyers' is kept beside it
                item["x-gateway-port"] = {method: item[method]}
                item["servers"] = admin
            item[method] = _admin_operation(settings, route)
    return doc


def _server(host: str, port: int, what: str) -> dict[str, str]:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return {"url": f"http://{shown}:{port}", "description": f"the {what} port"}


def _security() -> dict[str, Any]:
    return {
        "adminToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "admin.token (every scope) or one of admin.tokens; the scopes each "
            "call needs are listed in its security requirement.",
        },
        "buyerJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    }


def _problems(codes: Iterable[Code]) -> dict[str, Any]:
    """One response per status, naming its codes."""
    by_status: dict[int, list[str]] = defaultdict(list)
    for code in codes:
        by_status[STATUS[code][0]].append(code.value)
    return {
        str(status): {
            "description": "problem details: " + ", ".join(f"`{c}`" for c in names),
            "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status, names in sorted(by_status.items())
    }


def _json(schema: str, description: str, settings: Settings | None = None) -> dict[str, Any]:
    """An answer of the named schema (about a reservation, or a cart order when
    ``settings`` has carts)."""
    shape: dict[str, Any] = {"$ref": f"#/components/schemas/{schema}"}
    if settings is not None and settings.carts and schema in EITHER:
        shape = reservation_or_order(schema)
    return {"description": description, "content": {"application/json": {"schema": shape}}}


def _identity(settings: Settings) -> tuple[list[Any], list[Any]]:
    """The identity's parameters and security requirement."""
    if settings.identity.jwt is not None:
        return [], [{"buyerJwt": []}]
    header = {
        "name": settings.identity.header,
        "in": "header",
        "required": True,
        "description": "The buyer, set by the authenticating proxy in front of the gateway.",
        "schema": {"type": "string", "pattern": r"^[\x21-\x7e][\x20-\x7e]{0,255}$"},
    }
    return [header], []


def _purchase(settings: Settings, campaign: CampaignSettings) -> dict[str, Any]:
    parameters, security = _identity(settings)
    parameters.append(
        {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "required": campaign.require_idempotency_key,
            "description": "One per purchase (per click), the same on every retry of it: a "
            'structured-field string ("...") or bare text, 1 to 128 printable ASCII '
            "characters. Bound to the request (route, quantity, body) while its reservation "
            "lives; reused for another request: 422.",
            "schema": {"type": "string", "pattern": _KEY},
        }
    )
    headers = {
        name: {"$ref": f"#/components/headers/{name}"}
        for name in ("X-Reservation-Id", "Idempotent-Replayed", "RateLimit", "RateLimit-Policy")
    }
    room = campaign.waiting_room is not None
    if room:
        parameters.append(pass_parameter())
    responses: dict[str, Any] = {
        "2XX": {
            "description": "The backend accepted the order: its own answer, relayed.",
            "headers": headers,
            "content": {"*/*": {"schema": {}}},
        },
        **_problems(PURCHASE_CODES + (PASS_CODES if room else ())),
    }
    if campaign.forward == "queue":
        responses["202"] = {**_json("Queued", "Queued: poll status_url."), "headers": headers}
    responses["4XX"] = {
        "description": "The backend refused the order (its own answer, relayed); the "
        "reservation went back to stock.",
        "content": {"*/*": {"schema": {}}},
    }
    operation: dict[str, Any] = {
        "operationId": f"buy_{campaign.id.replace('-', '_')}",
        "summary": f"Buy from campaign {campaign.id}",
        "tags": ["buyers"],
        "parameters": parameters,
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": _order(campaign)},
            },
        },
        "responses": responses,
    }
    if security:
        operation["security"] = security
    return operation


def _cart_purchase(settings: Settings, cart: CartSettings) -> dict[str, Any]:
    """A cart's route: one order of several items, all or nothing."""
    parameters, security = _identity(settings)
    parameters.append(
        {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "required": cart.require_idempotency_key,
            "description": "One per order, the same on every retry of it (as for a purchase).",
            "schema": {"type": "string", "pattern": _KEY},
        }
    )
    headers = {
        name: {"$ref": f"#/components/headers/{name}"}
        for name in ("X-Reservation-Id", "X-Reservation-Items", "Idempotent-Replayed")
    }
    responses: dict[str, Any] = {
        "2XX": {
            "description": "The backend accepted the order, every item: its answer, relayed.",
            "headers": headers,
            "content": {"*/*": {"schema": {}}},
        },
        **_problems(PURCHASE_CODES),
        "4XX": {
            "description": "The backend refused the order (its own answer, relayed); every "
            "item went back to stock. A refusal of the gateway names the item that failed "
            "(campaign, code) and lists each (items); a bad cart names the item's path.",
            "content": {"*/*": {"schema": {}}},
        },
    }
    if cart.forward == "queue":
        responses["202"] = {**_json("Queued", "Queued: poll status_url."), "headers": headers}
    operation: dict[str, Any] = {
        "operationId": f"buy_cart_{cart.id.replace('-', '_')}",
        "summary": f"Buy one order of several items from cart {cart.id}",
        "tags": ["buyers"],
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": cart_body(settings, cart)}},
        },
        "responses": responses,
    }
    if security:
        operation["security"] = security
    return operation


def _queue(settings: Settings, campaign: CampaignSettings) -> dict[str, Any]:
    """A waiting room's paths: join and poll, its challenge, its page."""
    from gateway.contract.waiting_room import (
        CHALLENGE_CODES,
        JOIN_CODES,
        POLL_CODES,
        ticket_parameter,
    )

    base = f"/queue/{campaign.id}"
    name = campaign.id.replace("-", "_")

    def operation(
        verb: str, summary: str, responses: dict[str, Any], **more: Any
    ) -> dict[str, Any]:
        parameters, security = _identity(settings)
        found: dict[str, Any] = {
            "operationId": f"{verb}_{name}",
            "summary": summary,
            "tags": ["waiting room"],
            "parameters": parameters + more.pop("parameters", []),
            "responses": responses,
            **more,
        }
        if security:
            found["security"] = security
        return found

    join = operation(
        "join",
        f"Join the waiting room of {campaign.id} (again: the same place)",
        {
            "202": _json("QueueJoined", "In the room: the ticket to poll with."),
            **_problems(JOIN_CODES),
        },
        requestBody={
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/QueueJoin"}}},
        },
    )
    poll = operation(
        "poll",
        f"A waiter's state in {campaign.id}'s waiting room (admitted: the pass)",
        {
            "200": _json("QueueState", "The state; poll again after poll_after."),
            **_problems(POLL_CODES),
        },
        parameters=[ticket_parameter()],
    )
    paths: dict[str, Any] = {base: {"post": join, "get": poll}}
    if campaign.waiting_room is not None and campaign.waiting_room.proof_of_work is not None:
        paths[f"{base}/challenge"] = {
            "get": operation(
                "challenge",
                "A proof-of-work challenge to join with",
                {
                    "200": _json("Challenge", "Valid for a short time."),
                    **_problems(CHALLENGE_CODES),
                },
            )
        }
    page = {
        "operationId": f"page_{name}",
        "summary": "The waiting room's page for browsers",
        "tags": ["waiting room"],
        "security": [],
        "responses": {
            "200": {
                "description": "HTML.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    }
    paths[f"{base}/page"] = {"get": page}
    return paths


def _order(campaign: CampaignSettings) -> dict[str, Any]:
    from gateway.contract.schemas import order

    return order(campaign.max_quantity)


def _buyer_reservation(settings: Settings) -> dict[str, Any]:
    parameters, security = _identity(settings)
    parameters.insert(
        0,
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": RESERVATION_ID},
        },
    )
    operation: dict[str, Any] = {
        "operationId": "buyer_reservation",
        "summary": "A buyer's own reservation (anyone else's is 404)",
        "tags": ["buyers"],
        "parameters": parameters,
        "responses": {
            "200": _json(
                "BuyerReservation",
                "The reservation (or cart order) and, once there is one, the backend's answer.",
                settings,
            ),
            **_problems(BUYER_RESERVATION_CODES),
        },
    }
    if security:
        operation["security"] = security
    return operation


def _health(path: str) -> dict[str, Any]:
    ready = path == "/readyz"
    responses = {"200": _json("Health", "Ready." if ready else "Alive.")}
    if ready:
        responses["503"] = _json("Health", "Not ready (the document says why).")
    return {
        "operationId": path.strip("/"),
        "summary": "Readiness" if ready else "Liveness",
        "tags": ["health"],
        "security": [],
        "responses": responses,
    }


def _openapi_path(path: str) -> str:
    return path  # aiohttp's {name} is OpenAPI's


def _operation_id(route: AdminRoute) -> str:
    words = re.findall(r"[a-z]+", route.path.lower())
    return "_".join([route.method.lower(), *words])


def _admin_operation(settings: Settings, route: AdminRoute) -> dict[str, Any]:
    scope = route.scope
    admin = settings.admin
    if route.path == "/metrics" and admin is not None and admin.metrics_need_token:
        scope = "metrics"
    parameters = []
    if "{id}" in route.path:
        if route.path.startswith("/campaigns"):
            ids = [c.id for c in settings.campaigns]
            schema: dict[str, Any] = {"type": "string", "enum": ids} if ids else {"type": "string"}
        else:
            schema = {"type": "string", "pattern": RESERVATION_ID}
        parameters.append({"name": "id", "in": "path", "required": True, "schema": schema})
    if route.path.endswith("/dead-letters"):
        parameters += [
            {
                "name": "count",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
            {
                "name": "after",
                "in": "query",
                "schema": {"type": "string", "pattern": r"^[0-9]{1,20}-[0-9]{1,20}$"},
            },
        ]
    if route.answer == "Metrics":
        ok: dict[str, Any] = {
            "description": "Prometheus text exposition.",
            "content": {"text/plain": {"schema": {"$ref": "#/components/schemas/Metrics"}}},
        }
    else:
        ok = _json(route.answer, route.summary, settings)
    codes = (*route.codes, *(TOKEN_CODES if scope else ()))
    responses: dict[str, Any] = {"200": ok, **_problems(codes)}
    if route.path == "/reload":
        responses["202"] = _json("Reloaded", "Under --workers: every worker reloads.")
    operation: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "tags": ["admin"],
        "security": [{"adminToken": [scope]}] if scope else [],
        "responses": responses,
    }
    if scope:
        operation["x-scope"] = scope
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body == "StockChange",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}
            },
        }
    return operation


#: Headers the gateway adds to every order it forwards.
ORDER_HEADERS = {
    "X-Reservation-Id": "The reservation: treat it as your idempotency key (a redelivery "
    "carries the same one).",
    "X-Campaign-Id": "The campaign.",
    "X-User-Id": "The buyer, as the gateway determined them.",
    "X-Quantity": "Units reserved for this order.",
    "X-Delivery-Attempt": "1 for the first delivery; more for a redelivery or a retry.",
    "X-Forwarded-For": "The client the gateway determined, then the trusted proxies.",
    "X-Real-IP": "The client the gateway determined.",
    "X-Forwarded-Proto": "The scheme the buyer used.",
    "X-Forwarded-Host": "The host the buyer asked for.",
    "Forwarded": "The same, as RFC 7239 says.",
    "Via": "The hops, this gateway last (RFC 9110 7.6.3).",
}


_ACCEPTED = (
    "Accepted: the sale is committed (or held until confirmed, with on_success: hold). "
    "The answer is relayed to the buyer and kept for retries."
)
_REFUSED = (
    "Refused: the reservation goes back to stock and the answer is relayed. 401 and 407 "
    "are not taken as a refusal: the delivery is retried."
)
_FAILED = (
    "Failed: the reservation goes back to stock (sync: the buyer gets 502); in queue mode "
    "the order is retried with backoff, then dead-lettered."
)


def _order_webhook(settings: Settings) -> dict[str, Any]:
    parameters = [
        {
            "name": name,
            "in": "header",
            "required": name.startswith("X-"),
            "description": text,
            "schema": {"type": "string"},
        }
        for name, text in ORDER_HEADERS.items()
    ]
    routes = ", ".join(f"`{c.route}`" for c in settings.campaigns) or "the campaign routes"
    return {
        "post": {
            "operationId": "order",
            "summary": "A winner's order, forwarded to the campaign's upstream",
            "description": f"The buyer's request to {routes} (method, path, query, body and "
            "end-to-end headers), with the headers below added. Credentials the buyer sent "
            "(Authorization, Cookie) are not kept with queued or redelivered orders; the "
            "upstream's configured headers are sent with every one.",
            "parameters": parameters,
            "requestBody": {"required": False, "content": {"*/*": {"schema": {}}}},
            "responses": {
                "2XX": {"description": _ACCEPTED},
                "4XX": {"description": _REFUSED},
                "5XX": {"description": _FAILED},
            },
        }
    }
