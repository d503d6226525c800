"""Who is buying: a trusted header, or a verified JWT.

The header (``identity.header``) is only safe behind an authenticating proxy that
sets it and strips the client's own copy. With ``identity.jwt`` the user comes
from a Bearer token whose signature, expiry (required), audience and issuer are
checked; the header is then ignored. Verified tokens are remembered until they
expire, so a client hammering with one token costs one verification.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable

import jwt
from aiohttp import web

from gateway.config import IdentitySettings, JwtSettings
from gateway.problems import Code, Problem

Identity = Callable[[web.BaseRequest], str]

_USER_ID = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,255}")
_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer realm="flashgate", error="invalid_token"'}


def identity_for(settings: IdentitySettings) -> Identity:
    if settings.jwt is not None:
        return JwtIdentity(settings.jwt)
    return HeaderIdentity(settings.header)


def _checked(user: str, source: str, headers: dict[str, str] | None = None) -> str:
    if not _USER_ID.fullmatch(user):
        raise Problem(
            Code.UNAUTHENTICATED,
            f"the {source} must be 1 to 256 printable ASCII characters",
            headers=headers,
        )
    return user


class HeaderIdentity:
    def __init__(self, header: str) -> None:
        self.header = header
        #: RFC 9110 11.6.1: a 401 says how to authenticate; here, which header to send.
        self.challenge = {"WWW-Authenticate": f'Header realm="flashgate", name="{header}"'}

    def __call__(self, request: web.BaseRequest) -> str:
        values = request.headers.getall(self.header, [])
        if len(values) > 1:  # a proxy that added its copy instead of replacing the client's
            raise Problem(
                Code.UNAUTHENTICATED,
                f"the {self.header} header must come once",
                headers=self.challenge,
            )
        value = values[0].strip() if values else ""
        if not value:
            raise Problem(
                Code.UNAUTHENTICATED,
                f"the {self.header} header is missing or empty",
                headers=self.challenge,
            )
        return _checked(value, f"{self.header} header", self.challenge)


class JwtIdentity:
    CACHE_SIZE = 10_000

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._key = settings.secret or settings.public_key or ""
        self._required = ["exp", settings.claim]
        if settings.audience:
            self._required.append("aud")
        if settings.issuer:
            self._required.append("iss")
        #: token -> (user, expiry as a unix time)
        self._verified: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __call__(self, request: web.BaseRequest) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not token.isascii():
            raise Problem(
                Code.UNAUTHENTICATED,
                "an 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": 'Bearer realm="flashgate"'},
            )
        known = self._verified.get(token)
        if known is not None and known[1] + self.settings.leeway > time.time():
            self._verified.move_to_end(token)
            return known[0]
        user, expiry = self._verify(token)
        self._verified[token] = (user, expiry)
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)
        return user

    def _verify(self, token: str) -> tuple[str, float]:
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(s.algorithms),
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway,
                options={"require": self._required},
            )
        except jwt.PyJWTError as exc:
            raise Problem(
                Code.UNAUTHENTICATED,
                f"the bearer token was refused: {exc}",
                headers=_INVALID_TOKEN,
            ) from None
        user = claims.get(s.claim)
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not isinstance(user, str) or not user:
            raise Problem(
                Code.UNAUTHENTICATED,
                f"the token's {s.claim!r} claim names no user",
                headers=_INVALID_TOKEN,
            )
        try:
            expiry = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):  # PyJWT let through exp: 1e400
            raise Problem(
                Code.UNAUTHENTICATED, "the token's exp claim is not a time", headers=_INVALID_TOKEN
            ) from None
        return _checked(user, f"token's {s.claim!r} claim", _INVALID_TOKEN), expiry
