"""CORS for shops that sell from a browser (``gateway.cors``): preflights on campaign
routes and ``/reservations/{id}`` are answered, and answers to an allowed origin carry
the headers a browser needs to read them (the reservation id, Retry-After, the
RateLimit fields). Without ``gateway.cors`` nothing here runs: a preflight is 405 as
before. With it, a request without ``Origin`` costs one header lookup."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from gateway.config.settings import CorsSettings
from gateway.problems import Code, Problem

#: What a browser script may read of an answer besides the CORS-safelisted headers.
EXPOSED = (
    "X-Reservation-Id",
    "Idempotent-Replayed",
    "Retry-After",
    "Location",
    "RateLimit",
    "RateLimit-Policy",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)


class CorsPolicy:
    """One ``gateway.cors``, with its answer headers built once."""

    def __init__(self, settings: CorsSettings, identity_headers: Sequence[str]) -> None:
        self.settings = settings
        self.any = "*" in settings.allow_origins and not settings.allow_credentials
        self.origins = frozenset(o for o in settings.allow_origins if o != "*")
        needed = ("Content-Type", "Idempotency-Key", *identity_headers)
        names = dict.fromkeys([*needed, *settings.allow_headers])  # in order, once each
        self.allowed_headers = frozenset(n.lower() for n in names)
        self._allow_headers = ", ".join(names)
        common = {"Vary": "Origin"}
        if settings.allow_credentials:
            common["Access-Control-Allow-Credentials"] = "true"
        self._answer = {**common, "Access-Control-Expose-Headers": ", ".join(EXPOSED)}
        self._preflight = {
            **common,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            "Access-Control-Allow-Headers": self._allow_headers,
            "Access-Control-Max-Age": str(int(settings.max_age)),
        }

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower() in self.origins

    def _origin_value(self, origin: str) -> str:
        return "*" if self.any else origin

    def preflight(self, request: web.BaseRequest, methods: Sequence[str]) -> web.Response:
        """204 for an allowed origin, method and headers; 403 ``forbidden`` otherwise."""
        origin = request.headers.get("Origin", "")
        method = request.headers.get("Access-Control-Request-Method", "")
        asked = {
            h.strip().lower()
            for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
            if h.strip()
        }
        if not self.allows(origin):
            raise Problem(Code.FORBIDDEN, f"origin {origin!r} may not use this API from a browser")
        if method not in methods:
            raise Problem(
                Code.FORBIDDEN, f"{method or 'no method'} is not allowed at {request.path}"
            )
        if not asked <= self.allowed_headers:
            extra = ", ".join(sorted(asked - self.allowed_headers))
            raise Problem(Code.FORBIDDEN, f"headers not allowed from a browser: {extra}")
        headers = {
            **self._preflight,
            "Access-Control-Allow-Origin": self._origin_value(origin),
            "Access-Control-Allow-Methods": ", ".join(methods),
        }
        return web.Response(status=204, headers=headers)

    def decorate(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """An allowed origin may read the answer; every answer varies by Origin."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if self.allows(origin):
            response.headers.update(self._answer)
            response.headers["Access-Control-Allow-Origin"] = self._origin_value(origin)
        else:
            response.headers["Vary"] = "Origin"


Serve = Callable[[], Awaitable[web.StreamResponse]]


async def cross_origin(
    policy: CorsPolicy,
    request: web.BaseRequest,
    methods: Sequence[str] | None,
    serve: Serve,
) -> web.StreamResponse:
    """A preflight answered here (``methods``: what the path takes; None: not a CORS path),
    anything else served and decorated."""
    if (
        methods is not None
        and request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
    ):
        try:
            return policy.preflight(request, methods)
        except Problem as problem:
            return problem.response()
    response = await serve()
    if methods is not None:
        policy.decorate(request, response)
    return response
