"""Typed async wrappers of a campaign's waiting-room scripts (``lua/queue_*.lua``), and
the view a gateway answers polls from.

Every key is the campaign's (``CampaignKeys.queue``, one hash tag with its counters),
so each script reads the stock and changes the queue in one slot, atomically. Places,
the admission cursor and the passes live in Redis and change only inside scripts: two
gateways never admit the same slot twice, and the cap on passes holds across all.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from limiter.keys import CampaignKeys
from limiter.pipeline import AutoPipeline
from limiter.scripts import Scripts


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """What the scripts need of the waiting room's settings."""

    mode: str
    starts_at_ms: int
    admit_rate: float
    max_passes_per_unit: float
    close_factor: float
    pass_ttl_ms: int
    heartbeat_ms: int


class JoinStatus(IntEnum):
    WAITING = 0  #: in line (a new place, or the one held already)
    ADMITTED = 1  #: holds a pass already
    CLOSED = 2  #: too far back for the stock left: closed at once
    REPLAYED = 3  #: the proof-of-work salt was used before; nothing changed
    SOLD_OUT = 4  #: nothing left; nothing changed
    NO_CAMPAIGN = 5  #: the campaign has no counters in Redis


class Joined(NamedTuple):
    status: JoinStatus
    place: int
    #: 1-based; 0 while places are secret (the pre-queue of random mode)
    position: int
    #: waiters in line
    length: int
    #: the pass's expiry (ADMITTED), ms of Redis time
    expires_ms: int
    prequeue: bool


class WaiterState(IntEnum):
    WAITING = 0  #: in line
    ADMITTED = 1  #: holds an unused pass
    USED = 2  #: bought with the pass, which stays good for retries until it expires
    CLOSED = 3  #: told closed (too far back, or sold out)
    GONE = 4  #: lost the place (stopped polling, or let the pass expire), or never joined


class Waiter(NamedTuple):
    state: WaiterState
    place: int
    #: 1-based while waiting (0 in the pre-queue)
    position: int
    expires_ms: int


class PassStatus(IntEnum):
    NONE = 0  #: no pass, or it expired
    GOOD = 1  #: an unused pass within max_passes_per_unit x available
    USED = 2  #: a pass that bought already: good for the buyer's retries
    WITHDRAWN = 3  #: beyond the cap now (stock went down): its holder is back in line


#: Places of arrivals after a random pre-queue start here (2^40); see _prelude.lua.
LATE = 1 << 40
#: The view tells the places of this many waiters at the front exactly.
EXACT = 256


def block_of(place: int) -> int:
    """The block a place is counted in (queue_block in _prelude.lua), as a number that
    sorts the blocks in line order: the pre-queue's 4,096 first, then arrivals by 256."""
    if place >= LATE:
        return 4096 + (place - LATE) // 256
    return place >> 28


def _block_number(name: str) -> int:
    index = int(name[1:])
    return 4096 + index if name[0] == "l" else index


def _share_of_block(place: int) -> float:
    """How far into its block a place lies, 0 to 1."""
    if place >= LATE:
        return ((place - LATE) % 256) / 256
    return (place % (1 << 28)) / (1 << 28)


def _ints(value: Any) -> tuple[int, ...]:
    """cjson encodes an empty array as ``{}``."""
    return tuple(int(v) for v in value) if isinstance(value, list) else ()


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


class Blocks(NamedTuple):
    """Waiters per block of places, in line order, with the waiters before each."""

    numbers: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    before: tuple[int, ...] = ()

    @classmethod
    def parse(cls, flat: tuple[str, ...]) -> Blocks:
        pairs = sorted(
            (_block_number(flat[i]), int(flat[i + 1])) for i in range(0, len(flat) - 1, 2)
        )
        before, total = [], 0
        for _, count in pairs:
            before.append(total)
            total += count
        return cls(tuple(n for n, _ in pairs), tuple(c for _, c in pairs), tuple(before))


NO_BLOCKS = Blocks()


@dataclass(frozen=True, slots=True)
class View:
    """The waiting room as queue_tick.lua last described it (see there)."""

    now_ms: int
    available: int = 0
    #: waiters in line
    length: int = 0
    #: places are final (fifo, or random after the shuffle): positions can be told
    final: bool = True
    #: starts_at has passed: passes are being issued
    started: bool = True
    #: max_passes_per_unit x available, and close_factor x available
    cap: int = 0
    boundary: int = 0
    outstanding: int = 0
    holding_used: int = 0
    #: the places of the first EXACT waiters, in order
    front: tuple[int, ...] = ()
    blocks: Blocks = NO_BLOCKS
    joined: int = 0
    issued: int = 0
    expired: int = 0
    withdrawn: int = 0
    closed: int = 0
    abandoned: int = 0
    used: int = 0
    prequeue: int = 0
    shuffled_ms: int = 0
    recently_withdrawn: tuple[str, ...] = ()
    #: the latest passes issued, newest first: (user, expiry ms)
    recently_admitted: tuple[tuple[str, int], ...] = ()
    #: the campaign has no counters in Redis
    missing: bool = False

    @classmethod
    def parse(cls, text: bytes | str) -> View:
        data = json.loads(text)
        if data.get("missing"):
            return cls(now_ms=int(data["now"]), missing=True)
        admitted = [entry.rsplit(" ", 1) for entry in _texts(data.get("recently_admitted"))]
        return cls(
            now_ms=int(data["now"]),
            available=int(data["available"]),
            length=int(data["length"]),
            final=bool(data["final"]),
            started=bool(data["started"]),
            cap=int(data["cap"]),
            boundary=int(data["boundary"]),
            outstanding=int(data["outstanding"]),
            holding_used=int(data["holding_used"]),
            front=_ints(data.get("front")),
            blocks=Blocks.parse(_texts(data.get("blocks"))),
            joined=int(data["joined"]),
            issued=int(data["issued"]),
            expired=int(data["expired"]),
            withdrawn=int(data["withdrawn"]),
            closed=int(data["closed"]),
            abandoned=int(data["abandoned"]),
            used=int(data["used"]),
            prequeue=int(data["prequeue"]),
            shuffled_ms=int(data["shuffled_ms"]),
            recently_withdrawn=_texts(data.get("recently_withdrawn")),
            recently_admitted=tuple((user, int(expires)) for user, expires in admitted),
        )

    @property
    def sold_out(self) -> bool:
        return not self.missing and self.available <= 0

    def rank_of(self, place: int) -> tuple[int, int] | None:
        """The 0-based rank of the waiter at ``place`` and how far off it may be (exact
        among the first EXACT; beyond, within its block's count); None when this view
        says nobody waits there (admitted, gone, or joined since)."""
        front = self.front
        if front and place <= front[-1]:
            i = bisect.bisect_left(front, place)
            return (i, 0) if front[i] == place else None
        if len(front) < EXACT:
            return None  # the whole line is in front, and not this place
        blocks = self.blocks
        number = block_of(place)
        i = bisect.bisect_left(blocks.numbers, number)
        if i == len(blocks.numbers) or blocks.numbers[i] != number:
            return None
        count = blocks.counts[i]
        rank = blocks.before[i] + min(count - 1, int(_share_of_block(place) * count))
        return max(len(front), rank), count

    def document(self) -> dict[str, Any]:
        """The figures, for the admin API and ``flashgate status``."""
        return {
            "as_of_ms": self.now_ms,
            "waiting": self.length,
            "available": self.available,
            "passes_outstanding": self.outstanding,
            "passes_cap": self.cap,
            "close_beyond": self.boundary if self.final else None,
            "shuffled": self.final,
            "admitting": self.started and self.final,
            "joined": self.joined,
            "passes_issued": self.issued,
            "passes_used": self.used,
            "passes_expired": self.expired,
            "passes_withdrawn": self.withdrawn,
            "closed": self.closed,
            "abandoned": self.abandoned,
        }


class Tick(NamedTuple):
    view: View
    #: this call did the work (False: it read the view another gateway computed)
    computed: bool
    #: Redis's clock at the call
    now_ms: int
    #: how long each waiter admitted by this call had waited
    waits_ms: list[int]


class QueueStore:
    """The waiting-room operations of one campaign."""

    def __init__(
        self, pipe: AutoPipeline, scripts: Scripts, keys: CampaignKeys, policy: QueuePolicy
    ) -> None:
        self.pipe = pipe
        self.scripts = scripts
        self.keys = keys.queue
        self.state = keys.state
        self.policy = policy

    @property
    def _waiter_keys(self) -> list[str]:
        k = self.keys
        return [k.line, k.seen, k.members, k.passes, k.used, k.closed, k.meta]

    async def join(self, user: str, salt: str, salt_expiry_ms: int, entropy: str) -> Joined:
        p = self.policy
        reply = await self.pipe.script(
            self.scripts.queue_join,
            [*self._waiter_keys, self.keys.solved, self.state, self.keys.blocks],
            [user, p.mode, p.starts_at_ms, p.close_factor, salt, salt_expiry_ms, entropy],
            "join the waiting room",
        )
        status, place, position, length, expires, prequeue = (int(v) for v in reply)
        return Joined(JoinStatus(status), place, position, length, expires, bool(prequeue))

    async def tick(self, view_ttl_ms: int, *, force: bool = False) -> Tick:
        """Move the room forward and describe it (see queue_tick.lua)."""
        k, p = self.keys, self.policy
        keys = [*self._waiter_keys, k.bucket, k.view, k.withdrawn, k.solved, self.state]
        keys += [k.blocks, k.admitted]
        args: list[str | int | float] = [
            p.mode,
            p.starts_at_ms,
            p.admit_rate,
            p.max_passes_per_unit,
            p.close_factor,
            p.pass_ttl_ms,
            p.heartbeat_ms,
            view_ttl_ms,
            "force" if force else "",
        ]
        reply = await self.pipe.script(self.scripts.queue_tick, keys, args, "queue tick")
        return Tick(
            View.parse(reply[0]), bool(reply[1]), int(reply[2]), [int(w) for w in reply[3:]]
        )

    def submit_touch(self, items: Sequence[tuple[str, str]]) -> asyncio.Future[Any]:
        """Queue one queue_touch.lua call for (user, what they were told) pairs."""
        args: list[str | int | float] = [self.policy.mode, self.policy.close_factor]
        for user, told in items:
            args += (user, told)
        return self.pipe.submit_script(
            self.scripts.queue_touch, [*self._waiter_keys, self.state, self.keys.blocks], args
        )

    @staticmethod
    def waiters(items: Sequence[tuple[str, str]], reply: Sequence[Any]) -> list[Waiter]:
        values = [int(v) for v in reply]
        return [
            Waiter(WaiterState(values[i]), values[i + 1], values[i + 2], values[i + 3])
            for i in range(0, len(values), 4)
        ]

    async def touch(self, items: Sequence[tuple[str, str]]) -> list[Waiter]:
        reply = await self.pipe.guard.wait(self.submit_touch(items), "touch waiters")
        return self.waiters(items, reply)

    async def heartbeat(self, users: Sequence[str], now_ms: int) -> None:
        """These waiters were seen polling: one ZADD XX for all of them (a waiter who left
        the line meanwhile is not put back)."""
        pairs: list[str | int] = []
        for user in users:
            pairs += (now_ms, user)
        await self.pipe.call("ZADD", self.keys.seen, "XX", *pairs, what="waiters' heartbeats")

    def submit_pass_check(self, users: Sequence[str]) -> asyncio.Future[Any]:
        k = self.keys
        return self.pipe.submit_script(
            self.scripts.queue_pass_check,
            [k.passes, k.used, k.line, self.state],
            [self.policy.max_passes_per_unit, *users],
        )

    @staticmethod
    def pass_statuses(users: Sequence[str], reply: Sequence[Any]) -> list[PassStatus]:
        return [PassStatus(int(v)) for v in reply]

    async def check_passes(self, users: Sequence[str]) -> list[PassStatus]:
        reply = await self.pipe.guard.wait(self.submit_pass_check(users), "check passes")
        return self.pass_statuses(users, reply)

    async def use_passes(self, users: Sequence[str]) -> int:
        """Their reservations were made: the passes no longer count against the cap."""
        k = self.keys
        reply = await self.pipe.script(
            self.scripts.queue_pass_use, [k.passes, k.used, k.meta], list(users), "use passes"
        )
        return int(reply)
