"""Forwarding a winner's request to the shop's order backend, and reading its answer."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamError
from gateway.headers import GATEWAY_HEADERS, HOP_BY_HOP
from gateway.metrics import UPSTREAM_RESPONSES, UPSTREAM_SECONDS

#: Credentials never rest in Redis: an order kept there (queue mode, redelivery) goes to
#: the backend without them, and the backend knows the buyer by X-User-Id.
NOT_STORED = frozenset({"authorization", "cookie", "proxy-authorization"})
#: A backend answer larger than this is treated as a failure.
MAX_REPLY_BYTES = 4 * 1024 * 1024


class OutboundRequest(NamedTuple):
    """Exactly what goes to the backend: end-to-end headers plus the gateway's own."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes

    @classmethod
    def of(
        cls,
        method: str,
        path_qs: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
        extra: Mapping[str, str],
    ) -> OutboundRequest:
        forwarded = end_to_end(headers.items(), GATEWAY_HEADERS)
        forwarded.update(extra)
        return cls(method, path_qs, forwarded, body)

    def encode(self) -> bytes:
        """The order payload kept in Redis (reservation record, order queue, dead letters),
        without the buyer's credentials."""
        return json.dumps(
            {
                "method": self.method,
                "path": self.path_qs,
                "headers": [(k, v) for k, v in self.headers.items() if k.lower() not in NOT_STORED],
                "body": base64.b64encode(self.body).decode(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> OutboundRequest:
        order = json.loads(payload)
        return cls(
            order["method"],
            order["path"],
            CIMultiDict((str(k), str(v)) for k, v in order["headers"]),
            base64.b64decode(order["body"]),
        )


class UpstreamReply(NamedTuple):
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def end_to_end(
    headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The headers minus hop-by-hop ones, those named in Connection, and ``drop``."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    excluded = HOP_BY_HOP | named | drop
    return CIMultiDict((name, value) for name, value in pairs if name.lower() not in excluded)


class Upstream:
    """One order backend: a connection pool, a base URL and a timeout."""

    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: OutboundRequest) -> UpstreamReply:
        """Send the request; raises UpstreamError on refusal, breakage or timeout."""
        if self._session is None:
            raise RuntimeError("upstream is not open")
        url = self.settings.url + request.path_qs
        headers = request.headers
        if self.settings.headers:  # the gateway's own, never stored with the order
            headers = headers.copy()
            headers.update(self.settings.headers)
        started = time.perf_counter()
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.body,
                allow_redirects=False,
            ) as response:
                body = await self._read_body(response)
                reply = UpstreamReply(response.status, end_to_end(response.headers.items()), body)
        except TimeoutError as exc:
            self._measure(started, "timeout")
            raise UpstreamError(
                f"{self.name} did not answer within {self.settings.timeout:g}s", timed_out=True
            ) from exc
        except aiohttp.ClientError as exc:
            self._measure(started, "error")
            raise UpstreamError(
                f"{self.name} failed: {exc or type(exc).__name__}", timed_out=False
            ) from exc
        self._measure(started, f"{reply.status // 100}xx")
        return reply

    def _measure(self, started: float, status_class: str) -> None:
        UPSTREAM_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        UPSTREAM_RESPONSES.labels(self.name, status_class).inc()

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise UpstreamError(
                    f"{self.name} answered more than {MAX_REPLY_BYTES} bytes", timed_out=False
                )
            chunks.append(chunk)
        return b"".join(chunks)
