"""The waiting room's tokens, all signed with the room's secret: tickets (a waiter's
place), challenges (proof of work) and passes (the right to buy).

Tickets and challenges are HMAC-SHA256 under a label of their own, so that one never
stands in for the other; passes are JWTs (HS256), which a shop's own code can verify
with the same secret and any JWT library. Each names its user and campaign, and is
refused for anyone else (a challenge solved by one user is worthless to another: bots
cannot buy solutions from a farm). Signatures are compared in constant time. Times are
the room's clock (Redis's, see room.py), so every gateway judges an expiry alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeGuard

import jwt

from gateway.problems import Code, Problem

#: A ticket lasts this long at most (a waiter keeps it while they wait).
TICKET_LIFETIME_MS = 24 * 3600 * 1000
_TICKET_LABEL = b"flashgate-ticket\n"
_CHALLENGE_LABEL = b"flashgate-challenge\n"
_SALT = re.compile(r"[0-9a-f]{32}")
_NONCE = re.compile(r"[0-9]{1,20}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class Ticket(NamedTuple):
    user: str
    place: int
    issued_ms: int
    expires_ms: int


class Solution(NamedTuple):
    """A proof of work found valid; the salt is remembered in Redis as used."""

    salt: str
    expires_ms: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte:
            return bits + 8 - byte.bit_length()
        bits += 8
    return bits


def solves(salt: str, nonce: str, difficulty: int) -> bool:
    """SHA-256 of the UTF-8 text salt + nonce has at least ``difficulty`` leading zero bits."""
    return leading_zero_bits(hashlib.sha256((salt + nonce).encode()).digest()) >= difficulty


class QueueSigner:
    """Signs and checks one campaign's tickets, challenges and passes."""

    PASS_CACHE = 10_000
    #: Tickets verified, remembered: a waiter polls with the same one again and again.
    TICKET_CACHE = 100_000

    def __init__(self, secret: str, campaign: str) -> None:
        self._key = secret.encode()
        self.campaign = campaign
        #: the ``aud`` of this campaign's passes
        self.audience = f"flashgate:queue:{campaign}"
        #: (user, expiry) -> the pass: polls of an admitted waiter sign it once
        self._passes: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()

    def _mac(self, label: bytes, message: bytes) -> bytes:
        return hmac.new(self._key, label + message, hashlib.sha256).digest()

    # --- tickets

    def ticket(self, user: str, place: int, now_ms: int) -> str:
        claims = {"c": self.campaign, "u": user, "p": place, "t": now_ms}
        claims["e"] = now_ms + TICKET_LIFETIME_MS
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._mac(_TICKET_LABEL, body.encode()))}"

    def read_ticket(self, token: str, user: str, now_ms: int) -> Ticket:
        """The ticket's place; 403 ticket-invalid when forged, expired, for another
        campaign or another user."""
        ticket = self._tickets.get(token) or self._verify_ticket(token)
        if ticket.user != user:
            raise _ticket_problem("the ticket belongs to another user")
        if ticket.expires_ms <= now_ms:
            raise _ticket_problem("the ticket has expired: join again")
        return ticket

    def _verify_ticket(self, token: str) -> Ticket:
        body, _, signature = token.partition(".")
        try:
            given = _unb64(signature) if signature.isascii() else b""
        except ValueError:
            given = b""
        expected = self._mac(_TICKET_LABEL, body.encode("utf-8", "surrogateescape"))
        if not hmac.compare_digest(given, expected):
            raise _ticket_problem("the ticket is not one this gateway signed")
        claims = json.loads(_unb64(body))  # signed by us: well-formed
        ticket = _ticket_of(claims) if isinstance(claims, dict) else None
        if ticket is None or claims.get("c") != self.campaign:
            raise _ticket_problem(f"the ticket is not for campaign {self.campaign}")
        self._tickets[token] = ticket
        if len(self._tickets) > self.TICKET_CACHE:
            self._tickets.popitem(last=False)
        return ticket

    # --- challenges

    def challenge(self, user: str, difficulty: int, ttl_ms: int, now_ms: int) -> dict[str, Any]:
        """A fresh challenge for ``user``: ``{"salt", "difficulty", "expires", "signature"}``
        (``expires``: Unix seconds)."""
        salt = os.urandom(16).hex()
        expires = (now_ms + ttl_ms) // 1000
        return {
            "salt": salt,
            "difficulty": difficulty,
            "expires": expires,
            "signature": self._challenge_mac(user, salt, difficulty, expires),
        }

    def _challenge_mac(self, user: str, salt: str, difficulty: int, expires: int) -> str:
        message = f"{self.campaign}\n{user}\n{salt}\n{difficulty}\n{expires}".encode()
        return self._mac(_CHALLENGE_LABEL, message).hex()

    def check_solution(self, body: Any, user: str, difficulty: int, now_ms: int) -> Solution:
        """The solution in a join's body, checked without Redis (whether its salt was used
        before is the join script's to say); 403 challenge-failed when it is not good."""
        challenge = body.get("challenge") if isinstance(body, Mapping) else None
        nonce = body.get("nonce") if isinstance(body, Mapping) else None
        if isinstance(nonce, int) and not isinstance(nonce, bool) and nonce >= 0:
            nonce = str(nonce)
        if not isinstance(challenge, Mapping) or not isinstance(nonce, str):
            raise _challenge_problem(
                'the body must be {"challenge": <the challenge as received>, "nonce": "<decimal>"}'
            )
        salt, level, expires = (challenge.get(k) for k in ("salt", "difficulty", "expires"))
        signature = challenge.get("signature")
        if not (
            isinstance(salt, str)
            and _SALT.fullmatch(salt)
            and _whole(level)
            and _whole(expires)
            and isinstance(signature, str)
            and _SIGNATURE.fullmatch(signature)
            and hmac.compare_digest(signature, self._challenge_mac(user, salt, level, expires))
        ):
            raise _challenge_problem("the challenge is not one this gateway gave this user")
        if expires * 1000 <= now_ms:
            raise _challenge_problem("the challenge has expired: ask for a new one")
        if level < difficulty:
            raise _challenge_problem("the challenge is easier than the room now asks: ask again")
        if not _NONCE.fullmatch(nonce) or not solves(salt, nonce, level):
            raise _challenge_problem(f"SHA-256(salt + nonce) does not start with {level} zero bits")
        return Solution(salt, expires * 1000)

    # --- passes

    def issue_pass(self, user: str, expires_ms: int) -> str:
        """The pass of ``user``: the same token from every gateway for the same expiry."""
        key = (user, expires_ms)
        token = self._passes.get(key)
        if token is None:
            claims = {"sub": user, "aud": self.audience, "exp": expires_ms // 1000}
            token = jwt.encode(claims, self._key, algorithm="HS256")
            self._passes[key] = token
            if len(self._passes) > self.PASS_CACHE:
                self._passes.popitem(last=False)
        return token

    def read_pass(self, token: str, user: str, now_ms: int) -> int:
        """The pass's expiry (Unix ms); 403 queue-pass-invalid when it is forged, expired,
        for another campaign or another user."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=self.audience,
                options={"require": ["exp", "sub", "aud"], "verify_exp": False},
            )
        except jwt.PyJWTError as exc:
            raise _pass_problem(f"the pass was refused: {exc}") from None
        expires = claims.get("exp")
        if claims.get("sub") != user:
            raise _pass_problem("the pass belongs to another user")
        if not _whole(expires) or expires * 1000 <= now_ms:
            raise _pass_problem("the pass has expired: join the queue again")
        return int(expires) * 1000


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _ticket_of(claims: Mapping[str, Any]) -> Ticket | None:
    user, place, issued, expires = (claims.get(k) for k in ("u", "p", "t", "e"))
    if isinstance(user, str) and _whole(place) and _whole(issued) and _whole(expires):
        return Ticket(user, place, issued, expires)
    return None


def _ticket_problem(detail: str) -> Problem:
    return Problem(Code.TICKET_INVALID, detail)


def _challenge_problem(detail: str) -> Problem:
    return Problem(Code.CHALLENGE_FAILED, detail)


def _pass_problem(detail: str) -> Problem:
    return Problem(Code.QUEUE_PASS_INVALID, detail)
