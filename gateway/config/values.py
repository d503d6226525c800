"""Parsers of the values that have a syntax of their own: durations, routes, URLs,
times, networks, header maps, secrets. Each raises ``Invalid`` saying what is wrong."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network, ip_network
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.config.redis_url import parse_redis_url
from gateway.config.schema import Invalid, typed
from gateway.headers import NOT_CONFIGURABLE

#: Campaign ids are also the Redis hash tag and the prefix of reservation ids.
CAMPAIGN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/reservations/", "/queue/")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
HEADER_NAME = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(value: Any) -> float:
    """Seconds, from a number or a string like ``250ms``, ``2s``, ``5m``, ``1h``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise Invalid(
            f"must be a duration like 500ms, 2s, 5m or a number of seconds, got {value!r}"
        )
    if not math.isfinite(seconds):
        raise Invalid(f"must be a finite duration, got {value!r}")
    if seconds <= 0:
        raise Invalid(f"must be a positive duration, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def header_map(value: Any) -> Mapping[str, str]:
    """Header names and values; a value is never echoed (it is usually a credential)."""
    if not isinstance(value, Mapping):
        raise Invalid(f"must be a mapping of header names to values, got {type(value).__name__}")
    for name, text in value.items():
        if not isinstance(name, str) or not re.fullmatch(HEADER_NAME, name):
            raise Invalid(f"{name!r} is not a valid header name")
        if name.lower() in NOT_CONFIGURABLE:
            raise Invalid(f"{name} is set by the gateway itself and cannot be configured")
        if not isinstance(text, str) or any(c in text for c in "\r\n\x00"):
            raise Invalid(f"the value of {name} must be a string without CR, LF or NUL")
    return MappingProxyType(dict(value))


def route(value: Any) -> Route:
    """``"POST /seckill/phone-1111"``."""
    parts = value.split() if isinstance(value, str) else []
    if len(parts) != 2:
        raise Invalid(f"must be 'METHOD /path', got {value!r}")
    method, path = parts[0].upper(), parts[1]
    if method not in METHODS:
        raise Invalid(f"method must be one of {', '.join(METHODS)}, got {parts[0]!r}")
    if not path.startswith("/") or "?" in path or "#" in path:
        raise Invalid(f"path must start with / and carry no query, got {path!r}")
    if any(path == p or (p.endswith("/") and path.startswith(p)) for p in RESERVED_PATHS):
        raise Invalid(f"path {path!r} is reserved by the gateway ({', '.join(RESERVED_PATHS)})")
    return Route(method, path)


def http_url(value: Any) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"must be an http:// or https:// URL with a host, got {value!r}")
    if parts.query or parts.fragment:
        raise Invalid(f"must not carry a query or fragment, got {value!r}")
    try:
        parts.port  # noqa: B018 - reading it validates it
    except ValueError:
        raise Invalid(f"has an impossible port: {value!r}") from None
    return str(value).rstrip("/")


def redis_url(value: Any) -> str | None:
    """One server, a Sentinel service or a Cluster (see redis_url.py); None: embedded."""
    if value is None or value == "embedded":
        return None
    if not isinstance(value, str):
        raise Invalid(f"must be a Redis URL or 'embedded', got {type(value).__name__}")
    parse_redis_url(value)
    return value


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|\*")


def origins(value: Any) -> tuple[str, ...]:
    """Web origins (``https://shop.example``, ``http://localhost:3000``) or ``"*"``."""
    if not isinstance(value, list) or not value:
        raise Invalid(
            f"must be a non-empty list of origins like https://shop.example, got {value!r}"
        )
    for item in value:
        if not isinstance(item, str) or not _ORIGIN.fullmatch(item):
            raise Invalid(f"{item!r} is not an origin like https://shop.example (no path) or '*'")
    return tuple(str(item).lower() for item in value)


def positive(value: Any) -> float:
    value = typed(float, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"must be a number, got {value!r}")
    if not 0 < value < math.inf:
        raise Invalid(f"must be a positive number, got {value!r}")
    return float(value)


def secret(value: Any, least: int) -> str:
    """A secret, checked without echoing it into an error message or a log."""
    if not isinstance(value, str) or len(value) < least:
        raise Invalid(f"must be a string of at least {least} characters")
    return value


def instant(value: Any) -> datetime:
    """An ISO-8601 time with an offset: ``2026-11-11T00:00:00+08:00``."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise Invalid(
                f"must be an ISO-8601 time like 2026-11-11T00:00:00+08:00, got {value!r}"
            ) from None
    if not isinstance(value, datetime):
        raise Invalid(f"must be an ISO-8601 time like 2026-11-11T00:00:00+08:00, got {value!r}")
    if value.tzinfo is None:
        raise Invalid(f"must carry an offset (+08:00, Z), got {value.isoformat()!r}")
    return value


def networks(value: Any) -> tuple[IPv4Network | IPv6Network, ...]:
    """CIDRs (a bare address is a /32 or /128)."""
    if not isinstance(value, list):
        raise Invalid(f"must be a list of CIDRs, got {value!r}")
    parsed = []
    for item in value:
        try:
            parsed.append(ip_network(str(item), strict=False))
        except ValueError:
            raise Invalid(f"{item!r} is not a CIDR like 10.0.0.0/8") from None
    return tuple(parsed)
