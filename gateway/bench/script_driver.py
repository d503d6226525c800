"""The Redis-side driver of the shards scenario: one OS process per Redis node,
calling reserve.lua there as fast as the node answers, without a gateway
(``python -m gateway.bench.script_driver``; shards.py starts it).

Its job comes as one JSON line on stdin (``Job``). It connects with the gateway's
own connection (limiter/resp.py: AUTH, SELECT and TLS from the URL, commands packed
and replies parsed by hiredis), says ``ready`` on stdout, waits for ``go`` on stdin
(so that every node's driver starts at once, after the bench's first INFO), then
for ``seconds`` keeps ``WINDOW`` round trips of ``BATCH`` calls each in flight: one
EVALSHA per call, each deciding one attempt (a user and a reservation id never used
before, with an Idempotency-Key and an order the size of the gateway's), the calls
taking the node's shards in turn. It finishes the round trips in flight and prints
one JSON line: the calls answered, by status, the seconds and its own CPU seconds.

Why Python and not redis-benchmark with ``__rand_int__``: measured against one
private redis-server on the shared 2-vCPU VM (3 s each, twice), redis-benchmark's C
client spent 3.6-3.8 µs of CPU a call and this driver 10-13 µs, both small beside
the 66-82 µs Redis spent on each reserve.lua call: either keeps a node busy wherever
the node has a core of its own, so the decisions a second are the node's, not the
driver's. redis-benchmark is the faster client (C, no event loop, replies never
looked at), and where processes outnumber cores it leaves Redis a few percent more
CPU; but ``__rand_int__`` draws with replacement (in 60,000 calls a reservation id
and a few users came twice, and a repeat is a cheaper call), it cannot tell what a
reply said, and it is not always installed. Here every call is a fresh purchase,
and every reply is counted by what reserve.lua decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import hiredis

from gateway.config.redis_url import parse_redis_url
from limiter.keys import idempotency_field
from limiter.records import ReserveStatus
from limiter.resp import RespConnection, open_connection
from limiter.topology import Address, NodeOptions

#: Calls per round trip, and round trips in flight: 128 calls queued at the node,
#: as redis-benchmark's -P 32 over 4 connections would.
BATCH = 32
WINDOW = 4
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Job:
    #: The node (a redis:// URL with the credentials it needs).
    node: str
    #: Tells this process's users and reservation ids from the other drivers'.
    worker: int
    campaign: str
    sha: str
    #: Per shard: reserve.lua's six keys, then the prefix of its reservation records,
    #: then its events channel.
    shards: Sequence[Sequence[str]]
    #: reserve.lua's ARGV[1..4]: per-user limit, deadline ms, ledger max length, mode.
    policy: Sequence[str | int]
    #: The order kept on each record, and the request's fingerprint.
    payload: str
    fingerprint: str
    seconds: float

    def call(self, n: int) -> bytes:
        """The n-th call: one attempt, its user and reservation id new."""
        keys = self.shards[n % len(self.shards)]
        token = f"{self.worker:04x}{n:016x}"  # 20 hex digits, as a reservation id's
        user = f"driver-{self.worker}-{n}"
        command = (
            "EVALSHA",
            self.sha,
            7,
            *keys[:6],
            keys[6] + token,
            *self.policy,
            keys[7],
            f"{self.campaign}.{token}",
            user,
            1,
            idempotency_field(user, f"key-{n}"),
            self.payload,
            self.fingerprint,
        )
        return hiredis.pack_command(command)  # type: ignore[arg-type, no-any-return]


def outcome(reply: Any) -> int | str:
    """reserve.lua's status (or the error Redis answered), cheap to count: named once
    at the end (``named``)."""
    return f"error: {reply}" if isinstance(reply, Exception) else int(reply[0])


def named(counts: Counter[int | str]) -> dict[str, int]:
    return {
        ReserveStatus(key).name.lower().replace("_", "-") if isinstance(key, int) else key: n
        for key, n in counts.items()
    }


async def connect(node: str) -> RespConnection:
    parts = urlsplit(node)
    options = NodeOptions(parse_redis_url(node), CONNECT_TIMEOUT)
    address = Address(parts.hostname or "127.0.0.1", parts.port or 6379)
    return await asyncio.wait_for(open_connection(options, address), CONNECT_TIMEOUT)


async def drive(connection: RespConnection, job: Job) -> dict[str, Any]:
    statuses: Counter[int | str] = Counter()
    pending: deque[asyncio.Future[list[Any]]] = deque()
    sent = 0
    cpu, started = time.process_time(), time.perf_counter()
    deadline = started + job.seconds
    while True:
        while len(pending) < WINDOW and time.perf_counter() < deadline:
            packed = b"".join(job.call(n) for n in range(sent, sent + BATCH))
            pending.append(connection.round_trip(packed, BATCH))
            sent += BATCH
        if not pending:
            break
        statuses.update(map(outcome, await pending.popleft()))
    return {
        "calls": sum(statuses.values()),
        "statuses": named(statuses),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
    }


async def main() -> None:
    job = Job(**json.loads(sys.stdin.readline()))
    connection = await connect(job.node)
    try:
        print("ready", flush=True)
        go = await asyncio.to_thread(sys.stdin.readline)
        if go.strip() != "go":
            return  # the bench gave up before starting
        print(json.dumps(await drive(connection, job)), flush=True)
    finally:
        connection.close()


if __name__ == "__main__":
    with contextlib.suppress(ImportError):  # as the gateway runs (gateway/process/env.py)
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
