"""The settings: frozen dataclasses whose annotations and ``spec`` metadata say what
each field accepts (see schema.py). Built only by loading.py."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Any, Literal

from gateway.config.schema import spec
from gateway.config.values import (
    CAMPAIGN_ID,
    HEADER_NAME,
    Route,
    duration,
    header_map,
    http_url,
    instant,
    networks,
    origins,
    positive,
    redis_url,
    route,
    secret,
)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    #: None: start an embedded redis-server. Also redis+sentinel:// and redis+cluster://.
    url: str | None = spec(None, parse=redis_url)
    #: The sentinels' own password, when it differs from the data nodes' (in the URL).
    sentinel_password: str | None = None
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
    #: Also wait until the writes are in the primary's AOF and in that many replicas'
    #: (WAITAOF, Redis 7.2 and newer): a sale then survives a restart of every node.
    wait_for_aof: bool = False

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
    #: A connection's request head must arrive within this (answered 408, then closed):
    #: thousands of clients dribbling a header line a second must not hold descriptors.
    header_timeout: float = spec(10.0, parse=duration)
    #: An idle keep-alive connection is closed after this; it also bounds how long the
    #: next request's head may take on a kept-alive connection.
    keepalive_timeout: float = spec(30.0, parse=duration)
    #: Open connections one client address may hold (a trusted proxy's are not counted:
    #: they carry many buyers). None: no cap.
    max_connections_per_ip: int | None = spec(None, min=1, max=10_000_000)
    #: Open buyer connections per process; beyond it a connection is answered 503 and
    #: closed. None: the descriptor limit less what Redis and the backends may need.
    max_connections: int | None = spec(None, min=1, max=100_000_000)
    #: draft: RateLimit-Policy and RateLimit (IETF httpapi draft); legacy: X-RateLimit-*.
    ratelimit_headers: Literal["draft", "legacy", "off"] = "draft"
    #: Retry-After is spread over [t, t x (1 + this)] so that a crowd does not return at once.
    retry_after_jitter: float = spec(0.5, min=0, max=1)
    #: Cross-origin purchases from a browser; None: no CORS (preflights get 405).
    cors: CorsSettings | None = None


@dataclass(frozen=True, slots=True)
class CorsSettings:
    """Which web origins may buy from a browser, answered on campaign routes and
    /reservations/{id}."""

    #: Origins like https://shop.example (scheme, host, port), or "*" for any.
    allow_origins: tuple[str, ...] = spec(parse=origins)
    #: Request headers a browser may send besides the ones the gateway reads (the
    #: identity header, Authorization, Idempotency-Key and Content-Type are always allowed).
    allow_headers: tuple[str, ...] = spec((), pattern=HEADER_NAME)
    #: How long a browser may cache a preflight's answer.
    max_age: float = spec(600.0, parse=duration)
    #: Whether credentials (cookies) may come along; never with "*".
    allow_credentials: bool = False


Scope = Literal["read", "stock", "reservations", "confirm", "reload", "metrics"]
#: Every scope; admin.token has them all.
SCOPES: tuple[Scope, ...] = ("read", "stock", "reservations", "confirm", "reload", "metrics")


@dataclass(frozen=True, slots=True)
class AdminToken:
    """A named admin token with the scopes it may use (the ledger records the name)."""

    name: str = spec(pattern=r"[A-Za-z0-9_.-]{1,64}")
    token: str = spec(pattern=r"\S+")
    scopes: tuple[Scope, ...] = ()


@dataclass(frozen=True, slots=True)
class AdminSettings:
    #: The operators' token, with every scope (its ledger name is "admin").
    token: str | None = spec(None, pattern=r"\S+")
    #: Scoped tokens: the backend that confirms orders need not be able to set stock.
    tokens: tuple[AdminToken, ...] = ()
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
    secret: str | None = spec(None, parse=lambda v: secret(v, 32))
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
    header: str = spec("X-User-Id", pattern=HEADER_NAME)
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
        default_factory=lambda: MappingProxyType({}), metadata={"parse": header_map}
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
class ProofOfWorkSettings:
    """A join costs the client CPU: SHA-256 of a signed salt and a nonce must start with
    ``difficulty`` zero bits (each bit doubles the work: 16 is about 65,000 hashes, a
    second or two in a browser)."""

    difficulty: int = spec(min=1, max=32)
    #: A challenge must be solved and used within this (and is remembered as used so long).
    ttl: float = spec(120.0, parse=duration, min=5, max=3600)


@dataclass(frozen=True, slots=True)
class WaitingRoomSettings:
    """A queue in front of the sale: buyers join, wait their turn, and buy with a pass.
    Shared by every gateway through Redis, under the campaign's hash tag."""

    #: Passes issued per second, at most, by every gateway together.
    admit_rate: float = spec(parse=positive, max=10_000)
    #: Signs tickets, challenges and passes; the same on every gateway.
    secret: str = spec(parse=lambda v: secret(v, 32))
    #: random: who joined before starts_at gets a random place at starts_at; fifo: arrival order.
    mode: Literal["fifo", "random"] = "fifo"
    #: Joining opens this long before starts_at (the pre-queue); None: at starts_at.
    opens_before: float | None = spec(None, parse=duration, max=7 * 86400)
    #: Passes outstanding (issued, unexpired, not used) <= this x available.
    max_passes_per_unit: float = spec(2.0, parse=positive, min=1, max=1000)
    #: A waiter further back than this x available is told closed (an honest sold-out).
    close_factor: float = spec(3.0, parse=positive, min=1, max=1_000_000)
    #: A pass not used within this is void; its slot goes to the next waiter.
    pass_ttl: float = spec(60.0, parse=duration, min=1, max=86400)
    #: A waiter who has not polled for this long loses the place.
    heartbeat: float = spec(20.0, parse=duration, min=1, max=3600)
    #: Absent: joining costs nothing but the identity.
    proof_of_work: ProofOfWorkSettings | None = None
    #: The browser page hands an admitted buyer over to this URL (the pass in its
    #: fragment) instead of buying itself.
    shop_url: str | None = spec(None, parse=http_url)


@dataclass(frozen=True, slots=True)
class CampaignSettings:
    id: str = spec(pattern=CAMPAIGN_ID.pattern.strip("^$"))
    route: Route = spec(parse=route)
    upstream: str = spec()
    stock: int = spec(min=0, max=10**12)
    per_user_limit: int = spec(1, min=1, max=10**9)
    max_quantity: int = spec(1, min=1, max=10**9)
    #: The stock spread over this many shards, each its own Redis Cluster slot (on a
    #: cluster, its own node): one hot item beyond one Redis core. 1: one slot.
    shards: int = spec(1, min=1, max=64)
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
    #: A queue in front of the sale; buying then needs its pass (X-Queue-Pass).
    waiting_room: WaitingRoomSettings | None = None
    rate_limit: RateLimitSettings | None = None
    client_rate_limit: ClientRateLimitSettings | None = None
    #: A number (the ratio) or {ratio, window, mode}.
    admission_ratio: AdmissionSettings | None = spec(None, shorthand=_ratio)
    #: Refuse a purchase without an Idempotency-Key (400 idempotency-key-required).
    require_idempotency_key: bool = False


@dataclass(frozen=True, slots=True)
class CartSettings:
    """One order of several items, each from its own campaign (its own Redis slot and
    node): every item is reserved, or none is. The delivery fields mean what they mean
    for a campaign, for the order as a whole."""

    id: str = spec(pattern=CAMPAIGN_ID.pattern.strip("^$"))
    route: Route = spec(parse=route)
    upstream: str = spec()
    #: The campaigns whose items it may sell, each at most once per order.
    campaigns: tuple[str, ...] = spec(pattern=CAMPAIGN_ID.pattern.strip("^$"))
    #: Items per order at most (default: one per campaign listed).
    max_items: int | None = spec(None, min=1, max=64)
    forward: Literal["sync", "queue"] = "sync"
    forward_deadline: float = spec(30.0, parse=duration)
    on_success: Literal["commit", "hold"] = "commit"
    hold_seconds: float = spec(900.0, parse=duration)
    max_inflight: int = spec(16, min=1, max=100_000)
    max_attempts: int = spec(5, min=1, max=1000)
    retry_backoff: float = spec(0.5, parse=duration)
    max_retry_backoff: float = spec(30.0, parse=duration)
    require_idempotency_key: bool = False

    @property
    def most_items(self) -> int:
        return self.max_items or len(self.campaigns)


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    #: text: one line per record; json: one JSON object per line (the access log is
    #: JSON lines either way).
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class Settings:
    campaigns: tuple[CampaignSettings, ...] = ()
    #: Orders of several items across campaigns (all or nothing).
    carts: tuple[CartSettings, ...] = ()
    upstreams: Mapping[str, UpstreamSettings] = field(default_factory=lambda: MappingProxyType({}))
    redis: RedisSettings = RedisSettings()
    gateway: GatewaySettings = GatewaySettings()
    admin: AdminSettings | None = None
    identity: IdentitySettings = IdentitySettings()
    ledger: LedgerSettings = LedgerSettings()
    access_log: AccessLogSettings = AccessLogSettings()
    logging: LoggingSettings = LoggingSettings()

    def campaign(self, campaign_id: str) -> CampaignSettings | None:
        return next((c for c in self.campaigns if c.id == campaign_id), None)

    def cart(self, cart_id: str) -> CartSettings | None:
        return next((c for c in self.carts if c.id == cart_id), None)
