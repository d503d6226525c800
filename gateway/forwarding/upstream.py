"""Forwarding a winner's request to the shop's order backend, and reading its answer."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter

from gateway.config import UpstreamSettings
from gateway.forwarding.http1 import Http1Client, HttpFailure, NotSent
from gateway.headers import CONNECTION_HEADERS, GATEWAY_HEADERS, HOP_BY_HOP
from gateway.stats import UPSTREAM_RESPONSES, UPSTREAM_SECONDS

#: Credentials never rest in Redis: an order kept there (queue mode, redelivery) goes to
#: the backend without them, and the backend knows the buyer by X-User-Id.
NOT_STORED = frozenset({"authorization", "cookie", "proxy-authorization"})
#: A backend answer larger than this is treated as a failure.
MAX_REPLY_BYTES = 4 * 1024 * 1024


#: A client's headers the gateway drops: its own, and what it says about the connection
#: (``extra`` says that anew; Via is extended, not replaced).
_REPLACED = GATEWAY_HEADERS | CONNECTION_HEADERS | {"via"}


class UpstreamError(Exception):
    """The order backend could not be reached or failed to answer in time."""

    def __init__(self, detail: str, *, timed_out: bool) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


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
        # what a client said about the connection is dropped: ``extra`` says it anew
        forwarded = end_to_end(headers.items(), _REPLACED)
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
        self._client: Http1Client | None = None
        self._seconds = UPSTREAM_SECONDS.labels(name)
        self._responses: dict[str, Counter] = {}

    async def open(self) -> None:
        self._client = Http1Client(
            self.settings.url,
            max_connections=self.settings.max_connections,
            max_body=MAX_REPLY_BYTES,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def send(self, request: OutboundRequest) -> UpstreamReply:
        """Send the request; raises UpstreamError on refusal, breakage or timeout."""
        client = self._client
        if client is None:
            raise RuntimeError("upstream is not open")
        headers = request.headers
        if self.settings.headers:  # the gateway's own, never stored with the order
            headers = headers.copy()
            headers.update(self.settings.headers)
        started = time.perf_counter()
        try:
            encoded = client.encode(
                request.method, request.path_qs, list(headers.items()), request.body
            )
            answer = await client.send(request.method, encoded, self.settings.timeout)
        except NotSent as exc:
            self._measure(started, "timeout")
            raise UpstreamError(
                f"{self.name}: {exc}; the order was not sent", timed_out=True
            ) from exc
        except TimeoutError as exc:
            self._measure(started, "timeout")
            raise UpstreamError(
                f"{self.name} did not answer within {self.settings.timeout:g}s", timed_out=True
            ) from exc
        except HttpFailure as exc:
            self._measure(started, "error")
            raise UpstreamError(f"{self.name} failed: {exc}", timed_out=False) from exc
        reply = UpstreamReply(answer.status, end_to_end(answer.headers), answer.body)
        self._measure(started, f"{reply.status // 100}xx")
        return reply

    def _measure(self, started: float, status_class: str) -> None:
        self._seconds.observe(time.perf_counter() - started)
        counter = self._responses.get(status_class)
        if counter is None:
            counter = self._responses[status_class] = UPSTREAM_RESPONSES.labels(
                self.name, status_class
            )
        counter.inc()
