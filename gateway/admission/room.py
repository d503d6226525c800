"""One campaign's waiting room in this process: the latest view of it from Redis, what
this process knows of the waiters who poll here, and the answers built from both.

Polls are the flood, so they are answered from memory. A few times a second the
process asks Redis for the room's view (queue_tick.lua, which also moves the room
forward: every gateway's call may admit, by one token bucket on Redis's clock). A poll
from a waiter this process heard of recently is then answered without Redis: the
position from the view (exact among the first 256, within a block's count further
back), admitted from the passes the view lists as issued. What it owes Redis, the
heartbeat that keeps a waiter's place, goes as one ZADD a refresh for every waiter
seen (and only once a quarter of the heartbeat per waiter). Redis is asked at once, in
one call per event-loop tick for all of them, about a waiter this process has no
recent word on (their first poll here, a place no longer in the view's line, a
position near the closing boundary): the answer is then exact, and remembered.

Times are Redis's (``RoomClock``): a pass or a challenge expires at the same instant
for every gateway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gateway.admission.queue_tokens import QueueSigner, Ticket
from gateway.config.settings import CampaignSettings, WaitingRoomSettings
from gateway.problems import Code, Problem
from gateway.stats import WAITING_ROOM_WAIT_SECONDS
from limiter.batching import TickBatcher
from limiter.errors import StorageError
from limiter.logs import Throttled
from limiter.waiting import (
    Joined,
    JoinStatus,
    PassStatus,
    QueueStore,
    View,
    Waiter,
    WaiterState,
)

log = logging.getLogger(__name__)
_throttled = Throttled(log)

#: How often a process asks Redis for the view (jittered), and how long one gateway's
#: view is shared with the others: one computation per VIEW_TTL_MS however many.
REFRESH_SECONDS = 0.25
VIEW_TTL_MS = 100
#: Waiters remembered per campaign by a process (beyond: the oldest are asked again).
MAX_WAITERS = 500_000
#: Users per heartbeat command (or touch call) in the background.
TOUCH_CHUNK = 1000
#: Polls are spread: the suggested wait is drawn from [0.8, 1.2] x its base.
JITTER = 0.2
MIN_POLL_SECONDS = 0.25
#: Admission is measured over this long for the estimated wait.
RATE_WINDOW_MS = 30_000

QUEUE_PASS_HEADER = "X-Queue-Pass"


class RoomClock:
    """Redis's clock, estimated from the last answer: ``TIME`` at the middle of a round
    trip plus the monotonic time since. Before the first answer, the local clock."""

    def __init__(self) -> None:
        self._anchor_ms: float | None = None
        self._anchor_mono = 0.0

    def set(self, redis_ms: int, sent: float, received: float) -> None:
        self._anchor_ms = redis_ms + (received - sent) * 500
        self._anchor_mono = received

    def now_ms(self) -> int:
        if self._anchor_ms is None:
            return int(time.time() * 1000)
        return int(self._anchor_ms + (time.monotonic() - self._anchor_mono) * 1000)


@dataclass(slots=True)
class Known:
    """What this process knows of one waiter."""

    place: int
    state: WaiterState
    #: when Redis last had word of them from here: an answer about them, or their
    #: heartbeat (room clock, ms); no one loses a place within a heartbeat of that
    confirmed_ms: int
    #: the pass's expiry (admitted)
    expires_ms: int = 0


class AdmissionRate:
    """Passes issued per second lately, from the views' totals."""

    def __init__(self) -> None:
        self._samples: deque[tuple[int, int]] = deque()

    def add(self, view: View) -> None:
        if self._samples and self._samples[-1][0] >= view.now_ms:
            return
        self._samples.append((view.now_ms, view.issued))
        while len(self._samples) > 2 and view.now_ms - self._samples[1][0] >= RATE_WINDOW_MS:
            self._samples.popleft()

    def per_second(self, ideal: float) -> float:
        """What the estimate of a wait divides by: the observed rate (at least a twentieth
        of admit_rate: a stall of admission ends), or admit_rate before there is one."""
        if len(self._samples) < 2:
            return ideal
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 2000 or n1 == n0 == 0:
            return ideal
        observed = (n1 - n0) * 1000 / (t1 - t0)
        return min(ideal, max(observed, ideal / 20))


@dataclass
class RoomMemory:
    """What a process keeps of one room; it outlives the Campaign objects a reload
    replaces (a reload does not make every waiter a stranger)."""

    clock: RoomClock = field(default_factory=RoomClock)
    view: View | None = None
    waiters: OrderedDict[str, Known] = field(default_factory=OrderedDict)
    #: waiters seen polling whose heartbeat is due, and waiters told closed
    seen: set[str] = field(default_factory=set)
    told_closed: set[str] = field(default_factory=set)
    #: users whose pass bought, to tell Redis
    used: set[str] = field(default_factory=set)
    #: the views' totals of passes withdrawn and issued, as far as applied here
    withdrawn_seen: int = 0
    issued_seen: int = 0
    rate: AdmissionRate = field(default_factory=AdmissionRate)
    #: polls, joins, redis_checks (polls that had to ask Redis), challenges
    counts: Counter[str] = field(default_factory=Counter)


class Answer(NamedTuple):
    """A waiter's state, as the buyer's API tells it."""

    state: str
    position: int | None = None
    eta_seconds: int | None = None
    poll_after: float | None = None
    pass_token: str | None = None
    pass_expires_in: int | None = None
    #: places are not told before the shuffle: ``position`` is the pre-queue's length
    prequeue: bool = False

    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "state": self.state,
            "position": self.position,
            "eta_seconds": self.eta_seconds,
            "poll_after": self.poll_after,
        }
        if self.pass_token is not None:
            document["pass"] = self.pass_token
            document["pass_expires_in"] = self.pass_expires_in
        if self.state == "waiting":
            document["shuffled"] = not self.prequeue
        return document


CLOSED = Answer("closed")
EXPIRED = Answer("expired")


class WaitingRoom:
    """The waiting room of one campaign, in this process."""

    def __init__(
        self,
        campaign: CampaignSettings,
        store: QueueStore,
        memory: RoomMemory,
        *,
        sold_out: Callable[[], bool],
    ) -> None:
        assert campaign.waiting_room is not None
        self.settings: WaitingRoomSettings = campaign.waiting_room
        self.campaign_id = campaign.id
        self.store = store
        self.memory = memory
        self.sold_out = sold_out
        self.signer = QueueSigner(self.settings.secret, campaign.id)
        self.starts_ms = round(campaign.starts_at.timestamp() * 1000) if campaign.starts_at else 0
        self.ends_ms = round(campaign.ends_at.timestamp() * 1000) if campaign.ends_at else 0
        #: joining opens opens_before before starts_at (0: open)
        self.opens_ms = self.starts_ms - round((self.settings.opens_before or 0) * 1000)
        self.opens_ms = max(0, self.opens_ms) if self.starts_ms else 0
        self.heartbeat_ms = round(self.settings.heartbeat * 1000)
        self.join_path = f"/queue/{campaign.id}"
        guard = store.pipe.guard
        self._checks: TickBatcher[tuple[str, str], Waiter] = TickBatcher(
            guard, store.submit_touch, store.waiters, "ask about waiters"
        )
        self._pass_checks: TickBatcher[str, PassStatus] = TickBatcher(
            guard, store.submit_pass_check, store.pass_statuses, "check passes"
        )
        self._flushing_used: asyncio.Task[None] | None = None

    @property
    def clock(self) -> RoomClock:
        return self.memory.clock

    @property
    def view(self) -> View | None:
        return self.memory.view

    # --- the background: the view, heartbeats, used passes

    async def refresh(self) -> View:
        """Ask Redis for the view (moving the room forward), then tell it the heartbeats
        and verdicts this process owes."""
        sent = time.monotonic()
        tick = await self.store.tick(VIEW_TTL_MS)
        self.clock.set(tick.now_ms, sent, time.monotonic())
        self._apply(tick.view)
        for wait in tick.waits_ms:
            WAITING_ROOM_WAIT_SECONDS.labels(self.campaign_id).observe(wait / 1000)
        await self._report()
        await self._flush_used()
        return tick.view

    def _apply(self, view: View) -> None:
        """A new view: the waiters it says were admitted or withdrawn since the last one
        are known so here at once (a poll at the moment of admission asks no Redis)."""
        memory = self.memory
        memory.view = view
        memory.rate.add(view)
        fresh = view.withdrawn - memory.withdrawn_seen
        if fresh > 0:
            # a withdrawn holder is back in line: what this process knew of them is stale
            stale = (
                view.recently_withdrawn[:fresh]
                if fresh <= len(view.recently_withdrawn)
                else [u for u, k in memory.waiters.items() if k.state is WaiterState.ADMITTED]
            )
            for user in stale:
                memory.waiters.pop(user, None)
        memory.withdrawn_seen = view.withdrawn
        fresh = view.issued - memory.issued_seen
        # (more than the view lists: those missed are asked about when they poll)
        for user, expires in view.recently_admitted[: max(fresh, 0)]:
            known = memory.waiters.get(user)
            if known is not None and known.state is WaiterState.WAITING:
                known.state, known.expires_ms = WaiterState.ADMITTED, expires
        memory.issued_seen = view.issued

    async def _report(self) -> None:
        """The heartbeats of the waiters answered from memory (one ZADD XX per thousand),
        and the ones told closed (so that every gateway says the same)."""
        memory = self.memory
        closed, seen = sorted(memory.told_closed), sorted(memory.seen - memory.told_closed)
        memory.seen, memory.told_closed = set(), set()
        now = self.clock.now_ms()
        try:
            for i in range(0, len(seen), TOUCH_CHUNK):
                await self.store.heartbeat(seen[i : i + TOUCH_CHUNK], now)
                for user in seen[i : i + TOUCH_CHUNK]:
                    if (known := memory.waiters.get(user)) is not None:
                        known.confirmed_ms = now
            for i in range(0, len(closed), TOUCH_CHUNK):
                chunk = [(user, "closed") for user in closed[i : i + TOUCH_CHUNK]]
                for (user, _), waiter in zip(chunk, await self.store.touch(chunk), strict=True):
                    self._learn(user, waiter, now)
        except StorageError:  # owed still: the next refresh tells it
            memory.seen.update(u for u in seen if u in memory.waiters)
            memory.told_closed.update(closed)
            raise

    async def _flush_used(self) -> None:
        used, self.memory.used = self.memory.used, set()
        if used:
            try:
                await self.store.use_passes(sorted(used))
            except StorageError:
                self.memory.used |= used  # next time
                raise

    def _flush_used_soon(self) -> None:
        if self._flushing_used is None or self._flushing_used.done():
            self._flushing_used = asyncio.get_running_loop().create_task(self._flush_used_now())

    async def _flush_used_now(self) -> None:
        await asyncio.sleep(0)  # the rest of this tick's winners come along
        try:
            await self._flush_used()
        except StorageError as exc:
            _throttled.log(logging.WARNING, "use", "passes used, not told yet: %s", exc)

    # --- what this process knows of a waiter

    def _learn(self, user: str, waiter: Waiter, now: int) -> Known:
        waiters = self.memory.waiters
        known = Known(waiter.place, waiter.state, now, waiter.expires_ms)
        waiters.pop(user, None)
        waiters[user] = known
        while len(waiters) > MAX_WAITERS:
            waiters.popitem(last=False)
        return known

    def _saw(self, user: str, known: Known, now: int) -> None:
        if now - known.confirmed_ms >= self.heartbeat_ms / 4:
            self.memory.seen.add(user)

    def _told_closed(self, user: str, known: Known | None) -> Answer:
        self.memory.told_closed.add(user)
        if known is not None:
            known.state = WaiterState.CLOSED
        return CLOSED

    # --- the buyer's API

    def challenge(self, user: str) -> dict[str, Any]:
        pow_settings = self.settings.proof_of_work
        if pow_settings is None:
            raise Problem(Code.NOT_FOUND, f"the waiting room of {self.campaign_id} asks no work")
        self.memory.counts["challenges"] += 1
        ttl = round(pow_settings.ttl * 1000)
        return self.signer.challenge(user, pow_settings.difficulty, ttl, self.clock.now_ms())

    async def join(self, user: str, body: Any) -> tuple[Answer, str]:
        """Join (or ask again for the place): the answer and the waiter's ticket."""
        now = self.clock.now_ms()
        salt, salt_expires = "", 0
        if (pow_settings := self.settings.proof_of_work) is not None:
            salt, salt_expires = self.signer.check_solution(
                body, user, pow_settings.difficulty, now
            )
        joined = await self.store.join(user, salt, salt_expires, os.urandom(8).hex())
        self.memory.counts["joins"] += 1
        answer = self._joined(user, joined, now)
        return answer, self.signer.ticket(user, joined.place, now)

    def _joined(self, user: str, joined: Joined, now: int) -> Answer:
        match joined.status:
            case JoinStatus.REPLAYED:
                raise Problem(
                    Code.CHALLENGE_FAILED,
                    "this solution was used already: ask for a new challenge",
                )
            case JoinStatus.SOLD_OUT:
                raise Problem(
                    Code.SOLD_OUT,
                    f"campaign {self.campaign_id} is sold out",
                    campaign=self.campaign_id,
                )
            case JoinStatus.NO_CAMPAIGN:
                raise Problem(
                    Code.UNAVAILABLE,
                    f"campaign {self.campaign_id} is not initialised in Redis",
                    headers={"Retry-After": "1"},
                )
        state = {
            JoinStatus.WAITING: WaiterState.WAITING,
            JoinStatus.ADMITTED: WaiterState.ADMITTED,
            JoinStatus.CLOSED: WaiterState.CLOSED,
        }[joined.status]
        waiter = Waiter(state, joined.place, joined.position, joined.expires_ms)
        self._learn(user, waiter, now)
        if joined.prequeue:
            return self._waiting(joined.length, now, prequeue=True)
        return self._answer(user, waiter, joined.place, now)

    async def poll(self, user: str, token: str) -> Answer:
        now = self.clock.now_ms()
        ticket = self.signer.read_ticket(token, user, now)
        self.memory.counts["polls"] += 1
        if self.ends_ms and now >= self.ends_ms:
            return CLOSED
        answer = self._from_memory(user, ticket, now)
        if answer is not None:
            return answer
        self.memory.counts["redis_checks"] += 1
        waiter = await self._checks.submit((user, ""))
        now = self.clock.now_ms()
        self._learn(user, waiter, now)
        return self._answer(user, waiter, ticket.place, now)

    def _from_memory(self, user: str, ticket: Ticket, now: int) -> Answer | None:
        """The answer without Redis, or None: ask it."""
        view, known = self.view, self.memory.waiters.get(user)
        if view is None or view.missing or known is None:
            return None
        if known.state in (WaiterState.ADMITTED, WaiterState.USED):
            return self._admitted(user, known.expires_ms, now) if known.expires_ms > now else None
        if known.place != ticket.place:
            return None  # a ticket from another join of theirs: Redis knows which is live
        if known.state is WaiterState.CLOSED:
            return CLOSED
        if known.state is WaiterState.GONE:
            return EXPIRED
        if now - known.confirmed_ms > self.heartbeat_ms / 2:
            return None  # they may have lost the place since: only Redis knows
        if view.sold_out or self.sold_out():
            return self._told_closed(user, known)
        if not view.final:
            self._saw(user, known, now)
            return self._waiting(view.length, now, prequeue=True)
        estimate = view.rank_of(known.place)
        if estimate is None:
            return None  # not in line by this view: admitted or gone since
        rank, error = estimate
        position = rank + 1
        if position - error > view.boundary:
            return self._told_closed(user, known)
        if position + error > view.boundary:
            return None  # near the boundary: the exact position decides
        self._saw(user, known, now)
        return self._waiting(position, now)

    def _answer(self, user: str, waiter: Waiter, place: int, now: int) -> Answer:
        """The answer from what Redis just said."""
        match waiter.state:
            case WaiterState.ADMITTED | WaiterState.USED:
                return self._admitted(user, waiter.expires_ms, now)
            case WaiterState.CLOSED:
                return CLOSED
            case WaiterState.WAITING if waiter.place == place:
                if waiter.position == 0:
                    view = self.view
                    return self._waiting(view.length if view else 0, now, prequeue=True)
                return self._waiting(waiter.position, now)
        return EXPIRED

    def _admitted(self, user: str, expires_ms: int, now: int) -> Answer:
        expires_in = max(0, math.ceil((expires_ms - now) / 1000))
        return Answer(
            "admitted",
            position=0,
            eta_seconds=0,
            poll_after=float(max(1, expires_in)),
            pass_token=self.signer.issue_pass(user, expires_ms),
            pass_expires_in=expires_in,
        )

    def _waiting(self, position: int, now: int, *, prequeue: bool = False) -> Answer:
        eta = self._eta(position, now)
        return Answer(
            "waiting",
            position=position,
            eta_seconds=eta,
            poll_after=self._poll_after(position, eta, now, prequeue),
            prequeue=prequeue,
        )

    def _eta(self, position: int, now: int) -> int:
        view = self.view
        ideal = self.settings.admit_rate
        started = view is None or view.started
        rate = self.memory.rate.per_second(ideal) if started else ideal
        wait = position / rate + max(0, self.starts_ms - now) / 1000
        return min(86_400, math.ceil(wait))

    def _poll_after(self, position: int, eta: int, now: int, prequeue: bool) -> float:
        """Soon near the front (a pass is not kept waiting), rarely far back, always well
        within the heartbeat; jittered, so that a crowd does not poll in lockstep."""
        ceiling = self.settings.heartbeat / 3
        if prequeue:
            base = max(1.0, (self.starts_ms - now) / 5000)
        elif position <= max(10.0, 2 * self.settings.admit_rate):
            base = 1.0
        else:
            base = eta / 5
        base = min(ceiling, max(MIN_POLL_SECONDS, base))
        return round(base * random.uniform(1 - JITTER, 1 + JITTER), 2)

    # --- passes, at purchase

    def read_pass(self, headers: Mapping[str, str], user: str) -> None:
        """The pass a purchase carries, checked without Redis: 403 queue-pass-required
        without one, 403 queue-pass-invalid for a bad, expired or another user's."""
        token = headers.get(QUEUE_PASS_HEADER, "").strip()
        if not token:
            raise Problem(
                Code.QUEUE_PASS_REQUIRED,
                f"campaign {self.campaign_id} has a waiting room: join it at "
                f"{self.join_path} and buy with its pass in {QUEUE_PASS_HEADER}",
                join=self.join_path,
                page=f"{self.join_path}/page",
            )
        self.signer.read_pass(token, user, self.clock.now_ms())

    async def confirm_pass(self, user: str) -> None:
        """Redis's word on a pass just before its purchase's reservation: not withdrawn
        (stock fell below what the passes out allow), not gone."""
        status = await self._pass_checks.submit(user)
        if status in (PassStatus.GOOD, PassStatus.USED):
            return
        self.memory.waiters.pop(user, None)
        if status is PassStatus.WITHDRAWN:
            raise Problem(
                Code.QUEUE_PASS_INVALID,
                "stock fell below what the passes out allow: your pass is withdrawn and you "
                f"are back at the front of the queue ({self.join_path})",
                reason="withdrawn",
                join=self.join_path,
            )
        raise Problem(
            Code.QUEUE_PASS_INVALID,
            f"the pass is no longer valid: join the queue again at {self.join_path}",
            reason="expired",
            join=self.join_path,
        )

    def pass_used(self, user: str) -> None:
        """A reservation was made with this user's pass: its slot goes to the next waiter."""
        self.memory.used.add(user)
        known = self.memory.waiters.get(user)
        if known is not None and known.state is WaiterState.ADMITTED:
            known.state = WaiterState.USED
        self._flush_used_soon()

    def figures(self) -> dict[str, Any]:
        """What this process alone knows (with --workers, each worker its own)."""
        return {
            "waiters_known": len(self.memory.waiters),
            **{k: self.memory.counts[k] for k in ("polls", "redis_checks", "joins", "challenges")},
        }


async def run_rooms(rooms: Callable[[], list[WaitingRoom]]) -> None:
    """Refresh every waiting room of this process a few times a second."""
    while True:
        current = rooms()
        results = await asyncio.gather(*(r.refresh() for r in current), return_exceptions=True)
        for room, result in zip(current, results, strict=True):
            if isinstance(result, StorageError):
                _throttled.log(
                    logging.WARNING,
                    room.campaign_id,
                    "waiting room %s: %s",
                    room.campaign_id,
                    result,
                )
            elif isinstance(result, BaseException):
                log.error("waiting room %s failed", room.campaign_id, exc_info=result)
        await asyncio.sleep(REFRESH_SECONDS * random.uniform(1 - JITTER, 1 + JITTER))
