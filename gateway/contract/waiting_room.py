"""The waiting room's part of the OpenAPI document: its paths' parameters, answers and
problem codes, and the schemas of a join, a poll's answer and a challenge. openapi.py
puts them in for each campaign with a ``waiting_room`` (gateway/edge/queue.py serves
them)."""

from __future__ import annotations

from typing import Any

from gateway.admission.room import QUEUE_PASS_HEADER
from gateway.problems import Code

Schema = dict[str, Any]

#: What joining (or asking for a challenge) may be answered.
JOIN_CODES = (
    Code.BAD_REQUEST,
    Code.UNAUTHENTICATED,
    Code.CHALLENGE_FAILED,
    Code.NOT_STARTED,
    Code.ENDED,
    Code.REQUEST_TIMEOUT,
    Code.SOLD_OUT,
    Code.TOO_LARGE,
    Code.UNAVAILABLE,
)
POLL_CODES = (Code.BAD_REQUEST, Code.UNAUTHENTICATED, Code.TICKET_INVALID, Code.UNAVAILABLE)
CHALLENGE_CODES = (Code.UNAUTHENTICATED, Code.NOT_FOUND, Code.NOT_STARTED, Code.ENDED)
#: What a purchase on a campaign with a waiting room may be told besides the others.
PASS_CODES = (Code.QUEUE_PASS_REQUIRED, Code.QUEUE_PASS_INVALID)

_INT = {"type": "integer", "minimum": 0}
_NULLABLE_INT = {"type": ["integer", "null"], "minimum": 0}
_STATES = ["waiting", "admitted", "closed", "expired"]


def pass_parameter() -> dict[str, Any]:
    return {
        "name": QUEUE_PASS_HEADER,
        "in": "header",
        "required": True,
        "description": "The pass the waiting room gave (a JWT, HS256, bound to the buyer and "
        "the campaign); good for retries until it expires.",
        "schema": {"type": "string"},
    }


def ticket_parameter() -> dict[str, Any]:
    return {
        "name": "ticket",
        "in": "query",
        "required": True,
        "description": "The ticket the join gave (bound to the buyer).",
        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"},
    }


def _object(required: list[str], properties: dict[str, Any], **extra: Any) -> Schema:
    return {"type": "object", "required": required, "properties": properties, **extra}


def challenge() -> Schema:
    return _object(
        ["salt", "difficulty", "expires", "signature"],
        {
            "salt": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "difficulty": {"type": "integer", "minimum": 1, "maximum": 32},
            "expires": {"type": "integer", "description": "Unix seconds."},
            "signature": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
        description="Find a decimal nonce such that SHA-256 of the UTF-8 text salt + nonce "
        "starts with `difficulty` zero bits, then join with it.",
    )


def join_body() -> Schema:
    return _object(
        [],
        {
            "challenge": {"$ref": "#/components/schemas/Challenge"},
            "nonce": {"type": "string", "pattern": "^[0-9]{1,20}$"},
        },
        description="Empty when the room asks no proof of work.",
    )


def queue_state() -> Schema:
    return _object(
        ["state", "position", "eta_seconds", "poll_after"],
        {
            "state": {"type": "string", "enum": _STATES},
            "position": {**_NULLABLE_INT, "description": "1: next to be admitted."},
            "eta_seconds": _NULLABLE_INT,
            "poll_after": {"type": ["number", "null"], "minimum": 0},
            "pass": {"type": "string", "description": f"Admitted: send it as {QUEUE_PASS_HEADER}."},
            "pass_expires_in": _INT,
            "shuffled": {
                "type": "boolean",
                "description": "false in a random pre-queue: places are drawn at starts_at "
                "and position is the pre-queue's length until then.",
            },
        },
        additionalProperties=True,
    )


def joined() -> Schema:
    return {
        "allOf": [
            {"$ref": "#/components/schemas/QueueState"},
            _object(
                ["ticket", "poll_url"],
                {"ticket": {"type": "string"}, "poll_url": {"type": "string"}},
            ),
        ]
    }


def queue_schemas() -> dict[str, Schema]:
    return {
        "Challenge": challenge(),
        "QueueJoin": join_body(),
        "QueueState": queue_state(),
        "QueueJoined": joined(),
    }
