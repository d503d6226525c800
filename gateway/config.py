"""The YAML configuration: frozen dataclasses, one loader, errors with field paths."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import ConfigError
from gateway.headers import NOT_CONFIGURABLE
from gateway.schema import FromEnvironment, Invalid, Problems, build, spec, typed
from limiter.keys import CAMPAIGN_ID

#: Paths the gateway port answers itself; no campaign may take them.
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/reservations/")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_HEADER_NAME = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
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


def _headers(value: Any) -> Mapping[str, str]:
    """Header names and values; a value is never echoed (it is usually a credential)."""
    if not isinstance(value, Mapping):
        raise Invalid(f"must be a mapping of header names to values, got {type(value).__name__}")
    for name, text in value.items():
        if not isinstance(name, str) or not re.fullmatch(_HEADER_NAME, name):
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
    if value is None or value == "embedded":
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise Invalid(f"must be a redis://, rediss:// or unix:// URL, or 'embedded'; got {value!r}")
    return value


def positive(value: Any) -> float:
    value = typed(float, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"must be a number, got {value!r}")
    if not 0 < value < math.inf:
        raise Invalid(f"must be a positive number, got {value!r}")
    return float(value)


def _secret(value: Any, least: int) -> str:
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


@dataclass(frozen=True, slots=True)
class RedisSettings:
    #: None: start an embedded redis-server.
    url: str | None = spec(None, parse=redis_url)
    #: Deadline of every Redis call; a slower answer counts as a failure (fail closed).
    timeout: float = spec(0.25, parse=duration)
    #: redis-py's pool per process (pub/sub, script loads, stream groups); the request
    #: path's auto-pipeline keeps up to 4 connections of its own besides.
    max_connections: int = spec(16, min=1, max=10_000)
    key_prefix: str = spec("fg", pattern=r"[A-Za-z0-9_.-]{1,32}")
    #: Before a decision counts, this many replicas must have its writes (WAIT): a
    #: failover then cannot lose a sale that a backend was told about. 0: do not wait.
    wait_for_replicas: int = spec(0, min=0, max=10)
    replica_timeout: float = spec(0.1, parse=duration)

    @property
    def embedded(self) -> bool:
        return self.url is None


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = spec(8080, min=0, max=65535)
    max_body_bytes: int = spec(64 * 1024, min=1, max=16 * 1024 * 1024)
    #: A buyer's body must arrive within this (a slow sender must not hold a connection).
    body_timeout: float = spec(10.0, parse=duration)
    #: Peers whose X-Forwarded-For is believed (load balancers); nobody else's is.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = spec((), parse=networks)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str = spec(pattern=r"\S+")
    host: str = "127.0.0.1"
    port: int = spec(9090, min=0, max=65535)
    #: /metrics answers without the token unless this is true (it carries no personal data).
    metrics_need_token: bool = False


JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"
]


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """A signed identity: ``Authorization: Bearer <JWT>``, verified with expiry."""

    algorithms: tuple[JwtAlgorithm, ...] = ("HS256",)
    #: Shared secret (HS*) ...
    secret: str | None = spec(None, parse=lambda v: _secret(v, 32))
    #: ... or a PEM public key (RS*, ES*); use ${VAR} to take either from the environment.
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None
    #: The claim that names the user.
    claim: str = spec("sub", pattern=r"\S+")
    #: Clock skew tolerated on exp/nbf/iat.
    leeway: float = spec(0.0, min=0, max=300)


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    #: Trusted header carrying the user id: safe only behind an authenticating proxy.
    header: str = spec("X-User-Id", pattern=_HEADER_NAME)
    #: When set, the user comes from a verified JWT and the header is ignored.
    jwt: JwtSettings | None = None


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = spec(parse=http_url)
    timeout: float = spec(2.0, parse=duration)
    max_connections: int = spec(256, min=1, max=100_000)
    #: Sent with every request to this backend, replacing a client's copies: typically
    #: the gateway's own credential, the only one a queued or redelivered order carries.
    headers: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), metadata={"parse": _headers}
    )


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    enabled: bool = True
    #: "-" (stderr), "stdout", or a file to append to.
    path: str = spec("-", pattern=r".+")
    #: Also log refusals answered from memory (sold out, outside the window): at a flash
    #: sale's peak that is nearly every request, and logging costs more than answering.
    local_refusals: bool = False


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    #: Entries kept per campaign (approximately: Redis trims whole stream nodes).
    max_length: int = spec(100_000, min=100, max=100_000_000)


Mode = Literal["enforce", "shadow"]


@dataclass(frozen=True, slots=True)
class BucketSettings:
    """A token bucket: ``rate`` tokens per ``per``, holding ``burst`` when full."""

    rate: float = spec(parse=positive)
    per: float = spec(1.0, parse=duration)
    #: Tokens the bucket holds when full (default: one period's worth).
    burst: int | None = spec(None, min=1, max=10**9)
    #: shadow: never refuse, count what would have been refused.
    mode: Mode = "enforce"

    @property
    def per_second(self) -> float:
        return self.rate / self.per

    @property
    def capacity(self) -> int:
        return self.burst or max(1, math.ceil(self.rate))


@dataclass(frozen=True, slots=True)
class RateLimitSettings(BucketSettings):
    """A campaign-wide token bucket shared by every gateway through Redis."""

    #: Share of the rate one process may admit on its own while Redis is unreachable
    #: (default: 1 / the processes last seen alive).
    local_share: float | None = spec(None, parse=positive, max=1)


@dataclass(frozen=True, slots=True)
class ClientRateLimitSettings(BucketSettings):
    """A token bucket per client (user or IP), shared by every gateway through Redis."""

    key: Literal["user", "ip"] = "user"


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """At most ``ratio`` x available requests reach the deduction stage per ``window``."""

    ratio: float = spec(parse=positive)
    window: float = spec(1.0, parse=duration)
    mode: Mode = "enforce"


def _ratio(value: Any) -> Mapping[str, Any]:
    return {"ratio": value}


@dataclass(frozen=True, slots=True)
class CampaignSettings:
    id: str = spec(pattern=CAMPAIGN_ID.pattern.strip("^$"))
    route: Route = spec(parse=route)
    upstream: str = spec()
    stock: int = spec(min=0, max=10**12)
    per_user_limit: int = spec(1, min=1, max=10**9)
    max_quantity: int = spec(1, min=1, max=10**9)
    #: sync: forward each winner now; queue: a dispatcher delivers from a Redis stream.
    forward: Literal["sync", "queue"] = "sync"
    #: A reservation still unsettled this long after it was made (its gateway died, or
    #: lost Redis, before the backend's answer, or before queueing it) is delivered
    #: again from its kept order.
    forward_deadline: float = spec(30.0, parse=duration)
    #: commit: the backend's 2xx is the sale; hold: it reserves until confirmed (paid).
    on_success: Literal["commit", "hold"] = "commit"
    #: A held reservation not confirmed within this goes back to stock, quota included.
    hold_seconds: float = spec(900.0, parse=duration)
    #: Queue mode: at most this many deliveries in flight to the backend, all gateways together.
    max_inflight: int = spec(16, min=1, max=100_000)
    #: Queue mode: failed deliveries before an order is dead-lettered and its stock released.
    max_attempts: int = spec(5, min=1, max=1000)
    #: Queue mode: the first retry waits this long, doubling up to max_retry_backoff.
    retry_backoff: float = spec(0.5, parse=duration)
    max_retry_backoff: float = spec(30.0, parse=duration)
    #: The sale window; before it 403 not-started, after it 403 ended.
    starts_at: datetime | None = spec(None, parse=instant)
    ends_at: datetime | None = spec(None, parse=instant)
    rate_limit: RateLimitSettings | None = None
    client_rate_limit: ClientRateLimitSettings | None = None
    #: A number (the ratio) or {ratio, window, mode}.
    admission_ratio: AdmissionSettings | None = spec(None, shorthand=_ratio)


@dataclass(frozen=True, slots=True)
class Settings:
    campaigns: tuple[CampaignSettings, ...] = ()
    upstreams: Mapping[str, UpstreamSettings] = field(default_factory=lambda: MappingProxyType({}))
    redis: RedisSettings = RedisSettings()
    gateway: GatewaySettings = GatewaySettings()
    admin: AdminSettings | None = None
    identity: IdentitySettings = IdentitySettings()
    ledger: LedgerSettings = LedgerSettings()
    access_log: AccessLogSettings = AccessLogSettings()

    def campaign(self, campaign_id: str) -> CampaignSettings | None:
        return next((c for c in self.campaigns if c.id == campaign_id), None)


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, expand ``${VAR}`` and validate a YAML file; raises ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, [("", f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})")]
        ) from exc
    return parse_settings(text, source, environ)


def parse_settings(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> Settings:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {_yaml_reason(exc)}")]) from exc
    problems = Problems()
    data = _expand(data, "", os.environ if environ is None else environ, problems)
    if problems.items:
        raise ConfigError(source, problems.items)
    settings = build(Settings, data, "", problems)
    if settings is not None:
        _check_relations(settings, problems)
    if settings is None or problems.items:
        raise ConfigError(source, problems.items)
    return settings


def _check_relations(s: Settings, problems: Problems) -> None:
    for name in s.upstreams:
        if not _UPSTREAM_NAME.fullmatch(name):
            problems.add(f"upstreams.{name}", "names are 1 to 64 letters, digits, _ or -")
    seen_ids: dict[str, int] = {}
    seen_routes: dict[Route, int] = {}
    for i, c in enumerate(s.campaigns):
        at = f"campaigns[{i}]"
        if c.id in seen_ids:
            problems.add(f"{at}.id", f"{c.id!r} is already used by campaigns[{seen_ids[c.id]}]")
        seen_ids.setdefault(c.id, i)
        if c.route in seen_routes:
            problems.add(
                f"{at}.route", f"'{c.route}' is already used by campaigns[{seen_routes[c.route]}]"
            )
        seen_routes.setdefault(c.route, i)
        upstream = s.upstreams.get(c.upstream)
        if upstream is None:
            known = ", ".join(s.upstreams) or "none defined"
            problems.add(f"{at}.upstream", f"no upstream named {c.upstream!r} (known: {known})")
        elif c.forward_deadline <= upstream.timeout:
            problems.add(
                f"{at}.forward_deadline",
                f"must be longer than upstream {c.upstream!r}'s timeout ({upstream.timeout:g}s)",
            )
        if c.starts_at and c.ends_at and c.ends_at <= c.starts_at:
            problems.add(f"{at}.ends_at", "must be after starts_at")
    if (
        s.admin
        and (s.admin.host, s.admin.port) == (s.gateway.host, s.gateway.port)
        and s.admin.port
    ):
        problems.add("admin.port", "must differ from gateway.port on the same host")
    if s.identity.jwt is not None:
        _check_jwt(s.identity.jwt, problems)
    if s.redis.wait_for_replicas and s.redis.replica_timeout >= s.redis.timeout:
        problems.add(
            "redis.replica_timeout", f"must be shorter than redis.timeout ({s.redis.timeout:g}s)"
        )


#: RFC 7518 3.2: an HMAC key at least as long as the hash.
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def _check_jwt(jwt: JwtSettings, problems: Problems) -> None:
    """One key kind, matching the algorithms: mixing them invites algorithm confusion."""
    at = "identity.jwt"
    hmac = {a.startswith("HS") for a in jwt.algorithms}
    if not jwt.algorithms:
        problems.add(f"{at}.algorithms", "must name at least one algorithm")
    elif len(hmac) > 1:
        problems.add(f"{at}.algorithms", "must not mix HS* with RS*/ES* algorithms")
    elif (jwt.secret is None) == (jwt.public_key is None):
        problems.add(at, "needs exactly one of secret (HS*) or public_key (RS*, ES*)")
    elif hmac == {True}:
        strongest = max(jwt.algorithms)
        if jwt.secret is None:
            problems.add(f"{at}.secret", "HS* algorithms need a secret")
        elif len(jwt.secret.encode()) < _HMAC_KEY_BYTES[strongest]:
            needed = _HMAC_KEY_BYTES[strongest]
            problems.add(f"{at}.secret", f"{strongest} needs a secret of {needed} bytes or more")
    elif jwt.public_key is None:
        problems.add(f"{at}.public_key", "RS*/ES* algorithms need a public_key")
    else:
        try:
            load_pem_public_key(jwt.public_key.encode())
        except ValueError as exc:
            problems.add(f"{at}.public_key", f"is not a PEM public key: {exc}")


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, path: str, environ: Mapping[str, str], problems: Problems) -> Any:
    """Replace ``${VAR}`` (and ``${VAR:-default}``) in string values; ``$$`` is a dollar.
    What came from the environment is FromEnvironment text (see there)."""
    if isinstance(value, str):
        expanded = False

        def substitute(match: re.Match[str]) -> str:
            nonlocal expanded
            if match.group(0) == "$$":
                return "$"
            expanded = True
            name, default = match.group(1), match.group(2)
            if environ.get(name):
                return environ[name]
            if default is not None:  # like the shell's ${VAR:-x}: unset or empty
                return default
            if name in environ:
                return ""
            problems.add(path, f"environment variable {name} is not set")
            return ""

        text = _VARIABLE.sub(substitute, value)
        return FromEnvironment(text) if expanded else text
    if isinstance(value, dict):
        return {
            k: _expand(v, f"{path}.{k}" if path else str(k), environ, problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", environ, problems) for i, v in enumerate(value)]
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor": merged keys may be overridden, that is their purpose
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a key must be a plain value, not {type(key).__name__}",
                key_node.start_mark,
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return problem
