"""A flash-sale crowd on loopback: many buyers, bounded concurrency, measured answers.

Used by ``flashgate demo`` and ``flashgate bench``. It speaks HTTP/1.1 itself on
asyncio protocols, over keep-alive connections: a load generator must cost less
per request than the server it measures, and aiohttp's client costs more than
aiohttp's server. Every answer is tallied by outcome (the HTTP status for a
success, else the problem's ``code``) with its latency.

Closed loop by default (each connection sends its next request when the answer
arrives); with ``rate`` it is paced, and latency counts from the moment a request
was due, so a slow server cannot hide its queueing (no coordinated omission).

Buyers are drawn from a population of ``buyers`` distinct users, and a share of
requests (``keyed_share``) carries an Idempotency-Key of its own, as real clients'
purchases do; the tally says what was sent (requests with a key, distinct users),
so that a report can say what the crowd was, not only what it got.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

#: Plan of one request: (user, quantity, idempotency key or "", times to send it)
Planned = tuple[str, int, str, int]


@dataclass(frozen=True, slots=True)
class Crowd:
    host: str
    port: int
    path: str
    buyers: int
    concurrency: int
    #: Stop after this many requests, or after ``duration`` seconds.
    requests: int | None = None
    duration: float | None = None
    max_quantity: int = 1
    #: Share of requests that carry an Idempotency-Key and are sent twice.
    retry_share: float = 0.0
    #: Share of requests that carry an Idempotency-Key of their own (sent once).
    keyed_share: float = 0.0
    identity_header: str = "X-User-Id"
    #: Requests per second (paced); None: as fast as answers come back.
    rate: float | None = None
    seed: int = 1


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    #: reservation id -> (user, units) of every 2xx answer
    wins: dict[str, tuple[str, int]] = field(default_factory=dict)
    sent: int = 0
    elapsed: float = 0.0
    #: Latency quantiles over all answers, when a generator reports only those (wrk).
    quantiles: dict[float, float] | None = None
    #: What was sent: the population the buyers came from, the requests sent (answered
    #: or not: wrk stops with some in flight), those that carried an Idempotency-Key,
    #: and how many distinct users sent them.
    buyers: int = 0
    issued: int = 0
    keyed: int = 0
    distinct_users: int = 0

    def record(self, outcome: str, latency: float) -> None:
        self.outcomes[outcome] += 1
        self.latencies.setdefault(outcome, []).append(latency)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def all_latencies(self) -> list[float]:
        return [v for values in self.latencies.values() for v in values]

    def quantile(self, share: float) -> float:
        """Latency below which ``share`` of all answers came, in seconds."""
        if self.quantiles is not None:
            return self.quantiles[share]
        return percentile(self.all_latencies(), share)

    def outcome_quantile(self, outcome: str, share: float) -> float | None:
        """The same for the answers of one outcome; None when it cannot be known (a
        generator that reports quantiles over all answers of several outcomes)."""
        if outcome in self.latencies:
            return percentile(self.latencies[outcome], share)
        if self.quantiles is not None and len(self.outcomes) == 1:
            return self.quantiles[share]
        return None


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _plan(crowd: Crowd) -> Iterator[Planned]:
    rng = random.Random(crowd.seed)
    index = 0
    while crowd.requests is None or index < crowd.requests:
        user = f"buyer-{rng.randrange(crowd.buyers)}"
        quantity = rng.randint(1, crowd.max_quantity)
        retried = rng.random() < crowd.retry_share
        keyed = retried or _drawn(rng, crowd.keyed_share)
        yield user, quantity, f"req-{index}" if keyed else "", 2 if retried else 1
        index += 1


def _drawn(rng: random.Random, share: float) -> bool:
    """True for ``share`` of the calls; no draw at 0 or 1, so that a crowd without keys
    sends the very requests it sent before keys were an option."""
    if share <= 0.0 or share >= 1.0:
        return share >= 1.0
    return rng.random() < share


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending one request at a time."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = b""
        self.current: tuple[Planned, float] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP: a write transport
        self.run.ready(self)

    def send(self, planned: Planned, due: float) -> None:
        assert self.transport is not None
        self.current = (planned, due)
        self.transport.write(self.run.request(planned))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.current is not None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = _header(head, b"content-length")
            end = head_end + 4 + int(length or 0)
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            (planned, due), self.current = self.current, None
            self.run.answered(self, planned, due, head, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            planned, due = self.current
            self.current = None
            self.run.failed(planned, due)
        self.run.lost(self)
        if not self.closed.done():
            self.closed.set_result(None)


def _header(head: bytes, name: bytes) -> bytes | None:
    lowered = head.lower()
    start = lowered.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def _outcome(head: bytes, body: bytes) -> str:
    status = head[9:12].decode()
    if status[0] != "2" and b"problem+json" in head:
        at = body.find(b'"code":"')
        if at >= 0:
            return body[at + 8 : body.find(b'"', at + 8)].decode()
    return status


class _Run:
    def __init__(self, crowd: Crowd, on_answer: Callable[[], None] | None) -> None:
        self.crowd = crowd
        self.on_answer = on_answer
        self.tally = Tally()
        self.plan = _plan(crowd)
        self.repeats: list[Planned] = []
        self.idle: list[_Connection] = []
        self.stop_at = time.perf_counter() + crowd.duration if crowd.duration else float("inf")
        self.finished = asyncio.get_running_loop().create_future()
        self.in_flight = 0
        self.alive = crowd.concurrency
        self.exhausted = False
        self._host = f"Host: {crowd.host}:{crowd.port}\r\n".encode()
        self.users: set[str] = set()

    def request(self, planned: Planned) -> bytes:
        user, quantity, key, _ = planned
        body = b'{"quantity": %d}' % quantity
        head = [
            b"POST ",
            self.crowd.path.encode(),
            b" HTTP/1.1\r\n",
            self._host,
            self.crowd.identity_header.encode(),
            b": ",
            user.encode(),
            b"\r\n",
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
        ]
        if key:
            head += [b'Idempotency-Key: "', key.encode(), b'"\r\n']
        return b"".join(head) + b"\r\n" + body

    def next_planned(self) -> Planned | None:
        if self.repeats:
            return self.repeats.pop()
        if self.exhausted or time.perf_counter() >= self.stop_at:
            self.exhausted = True
            return None
        try:
            return next(self.plan)
        except StopIteration:
            self.exhausted = True
            return None

    def ready(self, connection: _Connection) -> None:
        """A connection can send: closed loop sends at once, paced waits for a due time."""
        if self.crowd.rate is not None:
            self.idle.append(connection)
            self._maybe_finish()
            return
        planned = self.next_planned()
        if planned is None:
            self._maybe_finish()
            return
        self.in_flight += 1
        connection.send(planned, time.perf_counter())

    def answered(
        self, connection: _Connection, planned: Planned, due: float, head: bytes, body: bytes
    ) -> None:
        self.in_flight -= 1
        outcome = _outcome(head, body)
        self.count_sent(planned)
        self.tally.record(outcome, time.perf_counter() - due)
        if outcome[0] == "2":
            rid = _header(head, b"x-reservation-id")
            if rid:
                self.tally.wins[rid.decode()] = (planned[0], planned[1])
        if planned[3] > 1:
            self.repeats.append((planned[0], planned[1], planned[2], planned[3] - 1))
        if self.on_answer is not None:
            self.on_answer()
        self.ready(connection)

    def count_sent(self, planned: Planned) -> None:
        self.tally.sent += 1
        self.tally.keyed += bool(planned[2])
        self.users.add(planned[0])

    def failed(self, planned: Planned, due: float) -> None:
        self.in_flight -= 1
        self.count_sent(planned)
        self.tally.record("connection-lost", time.perf_counter() - due)
        self._maybe_finish()

    def lost(self, connection: _Connection) -> None:
        self.alive -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if self.alive == 0 and not self.finished.done():
            self.finished.set_result(None)  # the server went away: report what there is

    def _maybe_finish(self) -> None:
        done = self.exhausted and self.in_flight == 0 and not self.repeats
        if done and not self.finished.done():
            self.finished.set_result(None)

    async def pace(self) -> None:
        """Paced mode: hand due requests to idle connections, at ``rate`` per second."""
        assert self.crowd.rate is not None
        interval = 1.0 / self.crowd.rate
        due = time.perf_counter()
        waiting: deque[tuple[Planned, float]] = deque()
        while True:
            now = time.perf_counter()
            while due <= now:
                planned = self.next_planned()
                if planned is None:
                    break
                waiting.append((planned, due))
                due += interval
            while waiting and self.idle:
                self.in_flight += 1
                planned, when = waiting.popleft()
                self.idle.pop().send(planned, when)
            if self.exhausted and not waiting:
                self._maybe_finish()
                return
            await asyncio.sleep(max(0.0, min(due - time.perf_counter(), 0.001)))


async def run_crowd(crowd: Crowd, on_answer: Callable[[], None] | None = None) -> Tally:
    loop = asyncio.get_running_loop()
    run = _Run(crowd, on_answer)
    started = time.perf_counter()
    connections = []
    for _ in range(crowd.concurrency):
        _, connection = await loop.create_connection(
            lambda: _Connection(run), crowd.host, crowd.port
        )
        connections.append(connection)
    pacing = asyncio.ensure_future(run.pace()) if crowd.rate is not None else None
    await run.finished
    run.tally.elapsed = time.perf_counter() - started
    run.tally.buyers = crowd.buyers
    run.tally.issued = run.tally.sent  # the crowd waits for every answer
    run.tally.distinct_users = len(run.users)
    if pacing is not None:
        pacing.cancel()
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    await asyncio.gather(*(c.closed for c in connections))
    return run.tally
