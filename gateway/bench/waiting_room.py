"""``flashgate bench --scenario waiting-room``: what a waiting-room poll costs.

One gateway process serves two campaigns: one with a waiting room (stock for
everyone, admission bound by ``admit_rate`` alone) and one sold out. Waiters join,
then poll flat out (ignoring ``poll_after``: this measures capacity, not manners) for
``--duration`` seconds over ``--concurrency`` connections; then the same client
sends sold-out purchases for as long. Reported: polls per second against the
sold-out path (the cheapest answer the gateway has), Redis commands per poll (all of
them, the gateway's background included, from INFO commandstats on every primary),
and the passes issued per second against ``admit_rate`` (from two views the admin
API computed, by Redis's clock: exact whatever the phase of the gateway's ticks).

The client is a keep-alive HTTP/1.1 loop on asyncio protocols that sends requests
encoded in advance, the same for both paths, so that the ratio compares the
gateway's two answers and not two clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.bench.crowd import Tally
from gateway.bench.datastore import Datastore
from gateway.bench.measure import Run
from gateway.bench.options import Options
from gateway.bench.systems import TOKEN, Served, answers, process
from gateway.embedded.server import free_port

SCENARIO = "waiting-room"
POLLS, SOLD_OUT_PATH = "polls", "sold-out path"
ROOM, SOLD_OUT = "bench-room", "bench-sold-out"
QUEUE = f"/queue/{ROOM}"
ADMIT_RATE = 200.0
SECRET = "bench-waiting-room-secret-not-a-secret-000"
#: Waiters per connection: enough that admission (ADMIT_RATE) never runs out of them.
WAITERS_PER_CONNECTION = 16
MIN_WAITERS = 2_000
GENERATOR = "waiting-room client"


# ------------------------------------------------------------------ the client


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending its requests in turn, one at a time."""

    def __init__(self, loop: _Loop, requests: list[bytes]) -> None:
        self.loop = loop
        self.requests = requests
        self.next = 0
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.WriteTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP: a write transport
        self._send()

    def _send(self) -> None:
        if not self.loop.going() or (self.loop.once and self.next >= len(self.requests)):
            self._finish()
            return
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.requests[self.next % len(self.requests)])
        self.next += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            length = _content_length(head)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self.loop.answered(head, body, time.perf_counter() - self.sent_at)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError("an answer without Content-Length")


@dataclass
class _Loop:
    """Closed-loop sending: until ``deadline``, or each request once (``once``)."""

    deadline: float | None
    once: bool
    tally: Tally = field(default_factory=Tally)
    bodies: list[bytes] = field(default_factory=list)
    keep_bodies: bool = False

    def going(self) -> bool:
        return self.deadline is None or time.perf_counter() < self.deadline

    def answered(self, head: bytes, body: bytes, latency: float) -> None:
        self.tally.sent += 1
        self.tally.record(head.split(b" ", 2)[1].decode(), latency)
        if self.keep_bodies:
            self.bodies.append(body)


async def send_all(
    port: int,
    requests: list[bytes],
    concurrency: int,
    *,
    seconds: float | None = None,
    keep_bodies: bool = False,
) -> _Loop:
    """Each request once (``seconds`` None) or round and round for ``seconds``, over
    ``concurrency`` connections each taking its share of the requests."""
    started = time.perf_counter()
    loop = _Loop(started + seconds if seconds else None, seconds is None, keep_bodies=keep_bodies)
    shares = [requests[i::concurrency] for i in range(concurrency) if requests[i::concurrency]]
    running = asyncio.get_running_loop()
    connections = []
    for share in shares:
        _, connection = await running.create_connection(
            lambda share=share: _Connection(loop, share),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
        connections.append(connection)
    await asyncio.gather(*(c.done for c in connections))
    loop.tally.elapsed = time.perf_counter() - started
    return loop


def _request(method: str, path: str, user: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\nX-User-Id: {user}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


# ------------------------------------------------------------------ the gateway


def _config(redis_url: str, backend: str, port: int, admin_port: int) -> dict[str, Any]:
    def campaign(campaign_id: str, stock: int) -> dict[str, Any]:
        return {
            "id": campaign_id,
            "route": f"POST /seckill/{campaign_id}",
            "upstream": "shop",
            "stock": stock,
        }

    room = campaign(ROOM, 10**9)
    # admission is bound by admit_rate alone: nobody closed, abandoned or out of time
    room["waiting_room"] = {
        "admit_rate": ADMIT_RATE,
        "max_passes_per_unit": 1,
        "close_factor": 1000,
        "pass_ttl": "1h",
        "heartbeat": "1h",
        "secret": SECRET,
    }
    return {
        "redis": {"url": redis_url},
        "gateway": {"port": port},
        "admin": {"port": admin_port, "token": TOKEN},
        "access_log": {"enabled": False},
        "upstreams": {"shop": {"url": backend, "timeout": 5.0}},
        "campaigns": [room, campaign(SOLD_OUT, 0)],
    }


@contextlib.contextmanager
def gateway(redis_url: str, backend: str) -> Iterator[Served]:
    """``flashgate run`` (one process) serving both campaigns, until the block ends."""
    port, admin_port = free_port(), free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(_config(redis_url, backend, port, admin_port), file)
    command = [sys.executable, "-m", "gateway", "--log-level", "warning", "run"]
    command += ["-c", file.name, "--workers", "1"]
    try:
        with process(command, answers(f"http://127.0.0.1:{port}/readyz"), "flashgate") as pid:
            yield Served(port, pid, f"http://127.0.0.1:{admin_port}")
    finally:
        os.unlink(file.name)


def _room(admin: str) -> tuple[int, int]:
    """Passes issued so far and the Redis time of that count, from a view computed now
    (the admin API's): two of them give the rate exactly, whatever the ticks' phase."""
    request = urllib.request.Request(
        f"{admin}/campaigns/{ROOM}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
        room = json.loads(response.read())["waiting_room"]
    return int(room["passes_issued"]), int(room["as_of_ms"])


# ------------------------------------------------------------------ the scenario


async def one_round(store: Datastore, backend: str, options: Options) -> dict[str, Run]:
    """Join, poll flat out, then hit the sold-out path: the two runs, measured."""
    concurrency, seconds = options.concurrency, options.seconds
    users = [f"waiter-{i}" for i in range(max(MIN_WAITERS, concurrency * WAITERS_PER_CONNECTION))]
    with gateway(store.url, backend) as served:
        joins = [_request("POST", QUEUE, user) for user in users]
        joined = await send_all(served.port, joins, concurrency, keep_bodies=True)
        if set(joined.tally.outcomes) != {"202"}:
            raise RuntimeError(f"joining the waiting room failed: {dict(joined.tally.outcomes)}")
        tickets = [json.loads(body)["ticket"] for body in joined.bodies]
        polls = [_request("GET", f"{QUEUE}?ticket={t}", _user_of(t)) for t in tickets]
        assert served.admin is not None
        issued_before, at_before = await asyncio.to_thread(_room, served.admin)
        before = await store.commands()
        polled = await send_all(served.port, polls, concurrency, seconds=seconds)
        poll_commands = await store.commands() - before
        issued_after, at_after = await asyncio.to_thread(_room, served.admin)
        refusals = [_request("POST", f"/seckill/{SOLD_OUT}", user) for user in users]
        before = await store.commands()
        refused = await send_all(served.port, refusals, concurrency, seconds=seconds)
        refusal_commands = await store.commands() - before
    issued = (issued_after - issued_before) * 1000 / max(at_after - at_before, 1)
    poll_verdict = {
        "correct": set(polled.tally.outcomes) == {"200"},
        "waiters": len(users),
        "passes_issued_per_second": round(issued, 1),
        "admit_rate": ADMIT_RATE,
    }
    return {
        POLLS: Run(
            POLLS,
            polled.tally,
            poll_commands,
            GENERATOR,
            verdict=poll_verdict,
            redis=store.description,
        ),
        SOLD_OUT_PATH: Run(
            SOLD_OUT_PATH,
            refused.tally,
            refusal_commands,
            GENERATOR,
            verdict={"correct": set(refused.tally.outcomes) == {"409"}},
            redis=store.description,
        ),
    }


def _user_of(ticket: str) -> str:
    """The user a ticket names (its claims are base64url JSON before the dot): the
    joins' answers come back in any order."""
    body = ticket.partition(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["u"])


def targets(runs: dict[str, dict[str, list[Run]]]) -> list[dict[str, Any]]:
    """The scenario's rows of the targets table (none when it did not run)."""
    rounds = runs.get(SCENARIO)
    if not rounds:
        return []
    pairs = list(zip(rounds[POLLS], rounds[SOLD_OUT_PATH], strict=True))
    ratio = statistics.median(p.tally.rate / s.tally.rate for p, s in pairs if s.tally.rate)
    per_poll = statistics.median(p.redis_commands / max(p.tally.sent, 1) for p, _ in pairs)
    issued = statistics.median(
        (p.verdict or {}).get("passes_issued_per_second", 0.0) / ADMIT_RATE for p, _ in pairs
    )
    return [
        {
            "target": "waiting room: polls vs the sold-out path",
            "goal": "measured",
            "measured": round(ratio, 3),
            "met": None,
        },
        {
            "target": "   Redis commands per poll (the background included)",
            "goal": "< 0.05",
            "measured": round(per_poll, 4),
            "met": per_poll < 0.05,
        },
        {
            "target": f"   passes issued per second vs admit_rate ({ADMIT_RATE:g})",
            "goal": "within 10 %",
            "measured": round(issued, 3),
            "met": abs(issued - 1) <= 0.1,
        },
    ]
