"""JSON Schemas of what the gateway sends and takes, by name (the OpenAPI document's
``components.schemas``). The problem ``code`` enum and each code's status come from
gateway/problems.py."""

from __future__ import annotations

from typing import Any

from gateway.config.settings import SCOPES
from gateway.problems import STATUS, TYPE_BASE, Code
from limiter.records import State

Schema = dict[str, Any]

_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_STATES = [s.value for s in State]


def _object(required: list[str], properties: dict[str, Any], **extra: Any) -> Schema:
    return {"type": "object", "required": required, "properties": properties, **extra}


def problem() -> Schema:
    """RFC 9457 problem details; ``code`` is one of gateway.problems.Code."""
    return _object(
        ["type", "title", "status", "detail", "code"],
        {
            "type": {"type": "string", "description": f"{TYPE_BASE}<code>"},
            "title": _STR,
            "status": {"type": "integer", "enum": sorted({s for s, _ in STATUS.values()})},
            "detail": _STR,
            "code": {"type": "string", "enum": [c.value for c in Code]},
        },
        additionalProperties=True,
        description="A refusal. Extension members depend on the code (limit, held, "
        "available, reservation_id, state, scope, problems, ...).",
    )


def _figures() -> dict[str, Any]:
    return {name: _INT for name in ("stock_total", "available", "reserved", "sold")}


def campaign() -> Schema:
    return _object(
        ["id", "route", "stock_total", "available", "reserved", "sold", "sold_out", "balanced"],
        {
            "id": _STR,
            "route": _STR,
            "upstream": _STR,
            **_figures(),
            "sold_out": _BOOL,
            "balanced": _BOOL,
            "per_user_limit": _INT,
            "max_quantity": _INT,
            "forward": {"type": "string", "enum": ["sync", "queue"]},
            "starts_at": _NULLABLE_STR,
            "ends_at": _NULLABLE_STR,
            "limits": {"type": "object"},
            "decided": _INT,
            "process": {"type": "object"},
        },
        additionalProperties=True,
    )


def reservation() -> Schema:
    return _object(
        ["id", "campaign", "user", "quantity", "state"],
        {
            "id": _STR,
            "campaign": _STR,
            "user": _STR,
            "quantity": _INT,
            "state": {"type": "string", "enum": _STATES},
            "mode": _STR,
            "created_ms": _INT,
            "updated_ms": _INT,
            "deadline_ms": _NULLABLE_INT,
            "reason": _NULLABLE_STR,
            "failed_deliveries": _INT,
            "conflict": _BOOL,
        },
        additionalProperties=True,
    )


def buyer_reservation() -> Schema:
    return _object(
        ["reservation_id", "campaign", "state", "quantity"],
        {
            "reservation_id": _STR,
            "campaign": _STR,
            "state": {"type": "string", "enum": _STATES},
            "quantity": _INT,
            "created_ms": _INT,
            "updated_ms": _INT,
            "reason": _NULLABLE_STR,
            "reply": _object(
                ["status", "content_type", "body"],
                {"status": _INT, "content_type": _STR, "body": _STR},
            ),
        },
    )


def queued() -> Schema:
    return _object(
        ["reservation_id", "status_url", "state"],
        {
            "reservation_id": _STR,
            "status_url": {"type": "string", "description": "GET it to learn the outcome"},
            "state": {"type": "string", "enum": _STATES},
        },
    )


def order(max_quantity: int) -> Schema:
    return {
        "type": "object",
        "properties": {
            "quantity": {"type": "integer", "minimum": 1, "maximum": max_quantity, "default": 1}
        },
        "additionalProperties": True,
        "description": "Any JSON object: quantity is the gateway's, the rest goes to the "
        "backend untouched. The body may also be empty (one unit).",
    }


def health() -> Schema:
    return _object(["status"], {"status": _STR}, additionalProperties=True)


def stock_change() -> Schema:
    return {
        "oneOf": [
            _object(["delta"], {"delta": _INT}, additionalProperties=False),
            _object(
                ["set"], {"set": {"type": "integer", "minimum": 0}}, additionalProperties=False
            ),
        ]
    }


def dead_letters() -> Schema:
    letter = _object(
        ["id", "reservation_id", "reason", "attempts"],
        {
            "id": _STR,
            "reservation_id": _STR,
            "reason": _STR,
            "attempts": _INT,
            "order": {"type": ["object", "null"]},
        },
    )
    return _object(
        ["campaign", "dead_letters"],
        {"campaign": _STR, "dead_letters": {"type": "array", "items": letter}},
    )


def replay() -> Schema:
    return _object(
        [],
        {
            "ids": {
                "type": "array",
                "items": {"type": "string", "pattern": r"^[0-9]{1,20}-[0-9]{1,20}$"},
                "maxItems": 1000,
            }
        },
        additionalProperties=False,
        description="No ids: the oldest dead letters, up to 1000.",
    )


def replayed() -> Schema:
    refused = _object(["id", "reason"], {"id": _STR, "reason": _STR})
    return _object(
        ["campaign", "replayed", "refused"],
        {
            "campaign": _STR,
            "replayed": {"type": "array", "items": _STR},
            "refused": {"type": "array", "items": refused},
        },
    )


def _with_flag(flag: str) -> Schema:
    """A reservation, with what the call did to it."""
    return {"allOf": [{"$ref": "#/components/schemas/Reservation"}, _object([flag], {flag: _BOOL})]}


def schemas() -> dict[str, Schema]:
    """Every named schema of the document."""
    return {
        "Problem": problem(),
        "Health": health(),
        "Queued": queued(),
        "BuyerReservation": buyer_reservation(),
        "Campaign": campaign(),
        "CampaignSettings": campaign(),
        "CampaignList": _object(
            ["campaigns"],
            {"campaigns": {"type": "array", "items": {"$ref": "#/components/schemas/Campaign"}}},
        ),
        "StockChange": stock_change(),
        "Reservation": reservation(),
        "Cancelled": _with_flag("released_now"),
        "Confirmed": _with_flag("confirmed_now"),
        "Reloaded": _object(["status"], {"status": _STR}, additionalProperties=True),
        "DeadLetters": dead_letters(),
        "Replay": replay(),
        "Replayed": replayed(),
        "OpenAPI": {"type": "object", "description": "This document."},
        "Metrics": {"type": "string", "description": "Prometheus text exposition."},
        "Scope": {"type": "string", "enum": list(SCOPES)},
    }
