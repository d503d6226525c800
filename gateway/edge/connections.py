"""Slow and greedy clients, handled per connection, never per request.

* **The request head has a deadline** (``gateway.header_timeout``): a connection whose
  first request head has not arrived in time is answered 408 and closed. aiohttp bounds
  a kept-alive connection's idle time and next head by ``keepalive_timeout``, but not a
  new connection's first head: thousands of clients dribbling one header line a second
  would otherwise hold a descriptor each for as long as they like.
* **Open connections per client address** (``gateway.max_connections_per_ip``): one
  over the cap is answered 429 ``too-many-connections`` and closed. A trusted proxy's
  connections are not counted (they carry many buyers; behind one, a per-IP
  ``client_rate_limit`` counts each buyer).
* **Open connections per process** (``gateway.max_connections``, by default the
  descriptor limit less what Redis and the backends may need): one over it is answered
  503 and closed at once, so that the process never runs out of descriptors and the
  buyers already connected keep being served.

All answers here are bytes built once. The only per-request cost is one dict pop when a
request head arrives.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections import Counter
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config import Settings
from gateway.core.snapshot import SnapshotHolder
from gateway.headers import PRODUCT
from gateway.problems import CONTENT_TYPE, STATUS, TYPE_BASE, Code

#: Descriptors kept free beside the buyers' connections: logs, listening sockets, the
#: admin port's clients, the embedded Redis's pipes, DNS.
SPARE = 128
#: The dispatcher's own Redis pool and the auto-pipeline's connections.
REDIS_EXTRA = 64 + 4


def connection_budget(settings: Settings, soft_limit: int | None = None) -> int:
    """Buyer connections one process may hold: ``gateway.max_connections``, or the
    descriptor limit less what the backends and Redis may use and a spare."""
    if settings.gateway.max_connections is not None:
        return settings.gateway.max_connections
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1 << 20
    backends = sum(u.max_connections for u in settings.upstreams.values())
    reserved = SPARE + REDIS_EXTRA + settings.redis.max_connections + backends
    return max(16, soft_limit - reserved, soft_limit // 4)


def _canned(code: Code, detail: str, retry_after: int | None = None) -> bytes:
    status, title = STATUS[code]
    body = json.dumps(
        {
            "type": TYPE_BASE + code.value,
            "title": title,
            "status": status,
            "detail": detail,
            "code": code.value,
        },
        separators=(",", ":"),
    ).encode()
    head = [
        f"HTTP/1.1 {status} {title}",
        f"Content-Type: {CONTENT_TYPE}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"Server: {PRODUCT}",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


HEAD_TOO_SLOW = _canned(Code.REQUEST_TIMEOUT, "the request head did not arrive in time")
TOO_MANY_FROM_YOU = _canned(
    Code.TOO_MANY_CONNECTIONS, "this address holds too many open connections", retry_after=1
)
FULL = _canned(
    Code.UNAVAILABLE, "this gateway process holds all the connections it can", retry_after=1
)


class GuardedServer(web.Server):
    """aiohttp's low-level server, counting connections and timing their first head."""

    def __init__(
        self,
        handler: Any,
        live: SnapshotHolder,
        budget: Callable[[], int],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=self._request, **kwargs)
        self.live = live
        self.budget = budget
        self.per_ip: Counter[str] = Counter()
        #: connection -> its client address, counted ("" when not counted)
        self._counted: dict[RequestHandler, str] = {}
        #: connections whose first request head has not arrived, with its deadline
        self._heads: dict[RequestHandler, asyncio.TimerHandle] = {}
        #: refusals, for the tests and the logs: "head", "per-ip", "full"
        self.refusals: Counter[str] = Counter()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        gateway = self.live.current.settings.gateway
        if len(self._counted) >= self.budget():
            self._refuse(handler, transport, FULL, "full")
            return
        address = _peer(transport)
        counted = "" if _trusted(address, gateway.trusted_proxies) else address
        cap = gateway.max_connections_per_ip
        if counted and cap is not None and self.per_ip[counted] >= cap:
            self._refuse(handler, transport, TOO_MANY_FROM_YOU, "per-ip")
            return
        self._counted[handler] = counted
        if counted:
            self.per_ip[counted] += 1
        loop = asyncio.get_running_loop()
        self._heads[handler] = loop.call_later(
            gateway.header_timeout, self._head_too_slow, handler, transport
        )

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        timer = self._heads.pop(handler, None)
        if timer is not None:
            timer.cancel()
        counted = self._counted.pop(handler, None)
        if counted:
            self.per_ip[counted] -= 1
            if self.per_ip[counted] <= 0:
                del self.per_ip[counted]

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> Any:
        timer = self._heads.pop(protocol, None)
        if timer is not None:  # the first head arrived in time
            timer.cancel()
        return self._make_request(message, payload, protocol, writer, task)

    def _head_too_slow(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if self._heads.pop(handler, None) is not None:
            self._refuse(handler, transport, HEAD_TOO_SLOW, "head")

    def _refuse(
        self, handler: RequestHandler, transport: asyncio.Transport, answer: bytes, why: str
    ) -> None:
        self.refusals[why] += 1
        if not transport.is_closing():
            transport.write(answer)
        handler.force_close()  # closes the transport once the answer is written

    @property
    def open_connections(self) -> int:
        return len(self._counted)


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _trusted(address: str, networks: Any) -> bool:
    if not networks or not address:
        return False
    try:
        parsed = ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)
