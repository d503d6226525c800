"""RFC 9457 problem details: every refusal the gateway gives, in one place."""

from __future__ import annotations

import json
import math
import random
from enum import StrEnum
from typing import Any

from aiohttp import web, web_response

from gateway.headers import PRODUCT

CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "urn:flashgate:problem:"


class Code(StrEnum):
    """The ``code`` member of a problem; each has one HTTP status."""

    BAD_REQUEST = "bad-request"  #: malformed input (body, quantity, Idempotency-Key)
    UNAUTHENTICATED = "unauthenticated"  #: no usable identity, or a bad admin token
    LIMIT_EXCEEDED = "limit-exceeded"  #: the user would hold more than per_user_limit
    NOT_STARTED = "not-started"  #: before the campaign window
    ENDED = "ended"  #: after the campaign window
    NOT_FOUND = "not-found"  #: no route, campaign or reservation
    METHOD_NOT_ALLOWED = "method-not-allowed"  #: the path exists, the method does not
    DUPLICATE = "duplicate"  #: an Idempotency-Key whose reservation is still in flight
    IDEMPOTENCY_KEY_REQUIRED = "idempotency-key-required"  #: the campaign requires one
    IDEMPOTENCY_KEY_MISMATCH = "idempotency-key-mismatch"  #: the key was used for another request
    FORBIDDEN = "forbidden"  #: an admin token without the scope, or a CORS origin not allowed
    TOO_MANY_CONNECTIONS = "too-many-connections"  #: over gateway.max_connections_per_ip
    SOLD_OUT = "sold-out"  #: nothing left
    INSUFFICIENT_STOCK = "insufficient-stock"  #: some left, fewer than asked
    EXPIRED = "expired"  #: the reservation went back to stock before this call
    NOT_HELD = "not-held"  #: confirm of a reservation that is not held
    REQUEST_TIMEOUT = "request-timeout"  #: the body did not arrive within gateway.body_timeout
    TOO_LARGE = "too-large"  #: body over gateway.max_body_bytes
    RATE_LIMITED = "rate-limited"  #: a rate limit or the admission budget said no
    INVALID_CONFIG = "invalid-config"  #: a reload found the file invalid (problems listed)
    INTERNAL = "internal"  #: a bug; the log has the traceback
    UPSTREAM_FAILED = "upstream-failed"  #: the backend failed (5xx, refused, broken)
    UNAVAILABLE = "unavailable"  #: Redis could not decide: fail closed
    UPSTREAM_TIMEOUT = "upstream-timeout"  #: the backend did not answer in time
    CHALLENGE_FAILED = "challenge-failed"  #: a wrong, expired, forged or used proof of work
    QUEUE_PASS_REQUIRED = "queue-pass-required"  #: the campaign has a waiting room: join it
    QUEUE_PASS_INVALID = "queue-pass-invalid"  #: a bad, expired, withdrawn or foreign pass
    TICKET_INVALID = "ticket-invalid"  #: a forged, expired or foreign waiting-room ticket


STATUS: dict[Code, tuple[int, str]] = {
    Code.BAD_REQUEST: (400, "Bad request"),
    Code.UNAUTHENTICATED: (401, "Unauthenticated"),
    Code.LIMIT_EXCEEDED: (403, "Purchase limit exceeded"),
    Code.NOT_STARTED: (403, "Sale has not started"),
    Code.ENDED: (403, "Sale has ended"),
    Code.NOT_FOUND: (404, "Not found"),
    Code.METHOD_NOT_ALLOWED: (405, "Method not allowed"),
    Code.DUPLICATE: (409, "Duplicate request"),
    Code.IDEMPOTENCY_KEY_REQUIRED: (400, "Idempotency-Key required"),
    Code.IDEMPOTENCY_KEY_MISMATCH: (422, "Idempotency-Key reused"),
    Code.FORBIDDEN: (403, "Forbidden"),
    Code.TOO_MANY_CONNECTIONS: (429, "Too many connections"),
    Code.SOLD_OUT: (409, "Sold out"),
    Code.INSUFFICIENT_STOCK: (409, "Insufficient stock"),
    Code.EXPIRED: (409, "Reservation expired"),
    Code.NOT_HELD: (409, "Reservation not held"),
    Code.REQUEST_TIMEOUT: (408, "Request timeout"),
    Code.TOO_LARGE: (413, "Request body too large"),
    Code.RATE_LIMITED: (429, "Too many requests"),
    Code.INVALID_CONFIG: (422, "Invalid configuration"),
    Code.INTERNAL: (500, "Internal error"),
    Code.UPSTREAM_FAILED: (502, "Upstream failed"),
    Code.UNAVAILABLE: (503, "Service unavailable"),
    Code.UPSTREAM_TIMEOUT: (504, "Upstream timeout"),
    Code.CHALLENGE_FAILED: (403, "Challenge failed"),
    Code.QUEUE_PASS_REQUIRED: (403, "Queue pass required"),
    Code.QUEUE_PASS_INVALID: (403, "Queue pass invalid"),
    Code.TICKET_INVALID: (403, "Ticket invalid"),
}


class Problem(Exception):
    """A refusal; raise it anywhere below a handler, or call ``response()``."""

    def __init__(
        self,
        code: Code,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    @property
    def status(self) -> int:
        return STATUS[self.code][0]

    def body(self) -> bytes:
        status, title = STATUS[self.code]
        document = {
            "type": TYPE_BASE + self.code.value,
            "title": title,
            "status": status,
            "detail": self.detail,
            "code": self.code.value,
            **self.extensions,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body(), content_type=CONTENT_TYPE, headers=self.headers
        )


def problem(code: Code, detail: str, **extensions: Any) -> web.Response:
    return Problem(code, detail, **extensions).response()


class CannedProblem:
    """A problem whose body is built once, for refusals on the hot path (sold out)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, problem: Problem) -> None:
        self.status = problem.status
        self.body = problem.body()
        self.headers = problem.headers

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, content_type=CONTENT_TYPE, headers=self.headers
        )


def retry_after(seconds: float, jitter: float) -> str:
    """A Retry-After value: whole seconds drawn evenly from ``[ceil(seconds),
    ceil(seconds x (1 + jitter))]``, never sooner than asked. A crowd told "1" would come
    back in the same second; spread over one or two it does not (``jitter``: the
    ``gateway.retry_after_jitter`` fraction, 0 for the exact value)."""
    low = max(1, math.ceil(seconds))
    high = max(low, math.ceil(low * (1 + jitter)))
    return str(low + int(random.random() * (high - low + 1)))


def name_the_server() -> None:
    """Every answer of this process's servers says ``Server: flashgate``, no versions (an
    attacker's scanner learns nothing to match against advisories). aiohttp has no
    setting for it and fills the header from this module constant when a response has
    none: replacing the constant costs nothing per answer, where setting the header on
    each would add to every sold-out one, and covers aiohttp's own error answers too."""
    web_response.SERVER_SOFTWARE = PRODUCT  # type: ignore[attr-defined]
