"""Queue mode's dispatcher: delivers queued orders to the backend, shaving the peak.

Every campaign's orders stream has one consumer group; every gateway process (or
``flashgate dispatch``) is a consumer. A delivery first takes one of the
campaign's ``max_inflight`` slots in Redis, so however many dispatchers run and
however large the crowd, the backend never sees more than ``max_inflight``
requests at once. The backend's answer settles the reservation (2xx commit or
hold, 4xx release); failures are retried with doubling backoff, and after
``max_attempts`` the order goes to the dead letters and its stock back. Orders a
dead dispatcher had taken are claimed by the others (XAUTOCLAIM) once idle for
longer than any live dispatcher would hold one.

An order enters the stream when the gateway that took it hands it over (as it
answers 202; see lua/hand_over.lua), or at its forward deadline if that gateway died.

Sync campaigns use the same path for reservations whose gateway died before the
backend's answer: the sweeper queues them here instead of releasing them.

Delivery is at least once: the backend must treat X-Reservation-Id as its
idempotency key (a redelivered order it already has gets the same answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

from redis.exceptions import RedisError, ResponseError

from gateway.forwarding.settle import accepted
from gateway.forwarding.upstream import OutboundRequest, Upstream, UpstreamError, UpstreamReply
from limiter.connection import RedisClient, disconnect
from limiter.errors import StorageError
from limiter.keys import CampaignKeys
from limiter.logs import Throttled
from limiter.records import State

log = logging.getLogger(__name__)
_trouble = Throttled(log)

GROUP = "flashgate"
#: How long one blocking read waits for new orders, ms.
READ_BLOCK_MS = 1000
#: How often a dispatcher looks for orders that dead dispatchers left behind.
CLAIM_EVERY = 2.0
#: How often an order being worked on is marked as alive (well below the idle time
#: after which other dispatchers claim it, 10 s beyond its timeout and backoff).
KEEP_EVERY = 3.0
#: How long to wait before asking again for a busy delivery slot.
SLOT_WAIT = (0.01, 0.05)
#: How long to wait before trying again when Redis could not be told an outcome.
SETTLE_RETRY = 0.5
#: How long a stopping dispatcher lets its deliveries finish, at most (seconds); within
#: the runtime's own grace, so that nothing is closed under a delivery.
STOP_GRACE = 4.0
#: Backend answers below 500 that are not its decision on the order: the delivery itself
#: was not let in (a queued or redelivered order carries the gateway's credential only).
NOT_A_DECISION = frozenset({401, 407})


class DeliveryPolicy(Protocol):
    """The settings a delivery follows (a campaign's, or a cart's)."""

    @property
    def upstream(self) -> str: ...
    @property
    def max_inflight(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_backoff(self) -> float: ...
    @property
    def max_retry_backoff(self) -> float: ...


class Delivered(Protocol):
    """What a delivery reads of the record it delivers (a reservation, or a cart order)."""

    @property
    def state(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def attempts(self) -> int: ...


class OrderSource(Protocol):
    """Where orders come from and are told about: an OrderBook (a campaign shard's
    store, or a cart's)."""

    @property
    def keys(self) -> CampaignKeys: ...
    async def reservation(self, reservation_id: str) -> Delivered | None: ...
    async def delivery_slot(self, how: str, holder: str, max_inflight: int, ttl_ms: int) -> int: ...
    async def keep_order(self, group: str, consumer: str, message_id: bytes) -> None: ...
    async def drop_order(self, group: str, message_id: bytes) -> None: ...
    async def count_attempt(self, reservation_id: str) -> int: ...


class Settling(Protocol):
    """Telling Redis the backend's answer (a Settlement, or a cart's)."""

    async def commit_accepted(self, rid: str, reply: UpstreamReply) -> None: ...
    async def release_refused(self, rid: str, reason: str, dead_letter: bytes = b"") -> None: ...
    async def keep_reply(self, rid: str, reply: UpstreamReply) -> None: ...


class Deliverable(Protocol):
    """What the dispatcher needs of a campaign's shard, or of a cart: its queue, its
    backend, its settling."""

    @property
    def id(self) -> str: ...
    @property
    def key(self) -> str:
        """Names it among all shards and carts (one dispatcher loop each)."""
        ...

    @property
    def settings(self) -> DeliveryPolicy: ...
    @property
    def store(self) -> OrderSource: ...
    @property
    def upstream(self) -> Upstream: ...
    @property
    def settle(self) -> Settling: ...


#: The campaigns' shards and the carts in force now (a reload replaces them), by key.
Campaigns = Callable[[], Mapping[str, Deliverable]]


class _Unsent(Exception):
    """The order never left (a fault in this process): no attempt is counted."""


#: The delivery's number: 1 for the first, more for a retry or a redelivery.
ATTEMPT_HEADER = "X-Delivery-Attempt"


def _numbered(order: OutboundRequest, record: Delivered) -> OutboundRequest:
    """The order with this delivery's number: the failed deliveries before it, plus one,
    plus the gateway's own forward when this is a sync order delivered again."""
    headers = order.headers.copy()
    headers[ATTEMPT_HEADER] = str(record.attempts + (2 if record.mode == "redelivery" else 1))
    return order._replace(headers=headers)


async def ensure_group(redis: RedisClient, orders: str) -> None:
    """Create the campaign's order queue and its consumer group, unless they exist."""
    try:
        await redis.xgroup_create(orders, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Dispatcher:
    def __init__(
        self, campaigns: Campaigns, redis: RedisClient, *, consumer: str, redis_timeout: float
    ) -> None:
        self.campaigns = campaigns
        #: A client of its own: blocking reads must not hold the request path's connections.
        self.redis = redis
        #: This process's name in every consumer group.
        self.consumer = consumer
        #: Bounds the blocking reads beyond their block time (redis.timeout).
        self.redis_timeout = redis_timeout
        #: shard or cart key -> (the object served, its loop); a reload replaces both
        self._loops: dict[str, tuple[Deliverable, asyncio.Task[None]]] = {}
        #: Set to stop: a blocking read does not always notice a cancellation, so the
        #: loops also look at this, and their connections are closed under them.
        self.stopping = asyncio.Event()
        #: Delivery attempts by (campaign, result), for metrics and tests.
        self.results: Counter[tuple[str, str]] = Counter()
        #: Deliveries under way, of every campaign: a stop waits for them.
        self._deliveries: set[asyncio.Task[None]] = set()
        #: The orders (stream key, message id) those deliveries are working on.
        self._delivering: set[tuple[str, bytes]] = set()

    async def run(self) -> None:
        """One loop per campaign, kept in step with the registry (reloads add and remove)."""
        try:
            while True:
                campaigns = self.campaigns()
                for cid, (served, task) in list(self._loops.items()):
                    if campaigns.get(cid) is not served or task.done():
                        task.cancel()
                        del self._loops[cid]
                for cid, campaign in campaigns.items():
                    if cid not in self._loops:
                        self._loops[cid] = (campaign, asyncio.ensure_future(self._serve(campaign)))
                await asyncio.sleep(1.0)
        finally:
            self.stopping.set()
            tasks = [task for _, task in self._loops.values()]
            for task in tasks:
                task.cancel()
            await disconnect(self.redis)
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            await self._finish_deliveries()

    async def _finish_deliveries(self) -> None:
        """Let deliveries under way get their answer and settle it; an order cut off
        stays unacked and another dispatcher delivers it again."""
        if not self._deliveries:
            return
        slowest = max((c.upstream.settings.timeout for c in self.campaigns().values()), default=0)
        deliveries = list(self._deliveries)
        try:
            await asyncio.wait(deliveries, timeout=min(STOP_GRACE, slowest + 1))
        finally:  # also when the runtime's grace runs out first and cancels this
            late = [task for task in deliveries if not task.done()]
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)

    async def _serve(self, campaign: Deliverable) -> None:
        limit = campaign.settings.max_inflight
        deliveries: set[asyncio.Task[None]] = set()  # this campaign's
        claimed_at = 0.0
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            try:
                await self._ensure_group(campaign)
                while not self.stopping.is_set():
                    if len(deliveries) >= limit:
                        await asyncio.wait(deliveries, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    free = limit - len(deliveries)
                    messages: list[Any] = []
                    if loop.time() - claimed_at > CLAIM_EVERY:
                        messages += await self._claim(campaign, free)
                        claimed_at = loop.time()
                    messages += await self._read(campaign, max(1, free - len(messages)))
                    for message_id, fields in messages:
                        if (campaign.store.keys.orders, message_id) in self._delivering:
                            continue  # claimed back while this process still delivers it
                        task = asyncio.ensure_future(self._deliver(campaign, message_id, fields))
                        for group in (deliveries, self._deliveries):
                            group.add(task)
                            task.add_done_callback(group.discard)
            except (StorageError, RedisError, OSError, TimeoutError) as exc:
                if self.stopping.is_set():
                    return
                log.debug("dispatcher of %s: %s; retrying", campaign.id, exc)
                await asyncio.sleep(0.5)

    async def _ensure_group(self, campaign: Deliverable) -> None:
        await ensure_group(self.redis, campaign.store.keys.orders)

    async def _read(self, campaign: Deliverable, count: int) -> list[Any]:
        async with asyncio.timeout(READ_BLOCK_MS / 1000 + 5 * self.redis_timeout):
            reply: Any = await self.redis.xreadgroup(
                GROUP,
                self.consumer,
                {campaign.store.keys.orders: ">"},
                count=count,
                block=READ_BLOCK_MS,
            )
        return [message for _, messages in reply or [] for message in messages]

    async def _claim(self, campaign: Deliverable, count: int) -> list[Any]:
        s = campaign.settings
        idle_ms = round(1000 * (campaign.upstream.settings.timeout + s.max_retry_backoff + 10))
        async with asyncio.timeout(5 * self.redis_timeout):
            reply = await self.redis.xautoclaim(
                campaign.store.keys.orders, GROUP, self.consumer, idle_ms, "0-0", count=count
            )
        return list(reply[1])

    async def _deliver(
        self, campaign: Deliverable, message_id: bytes, fields: dict[bytes, bytes]
    ) -> None:
        mark = (campaign.store.keys.orders, message_id)
        self._delivering.add(mark)
        keeper = asyncio.ensure_future(self._keep(campaign, message_id))
        try:
            await self._deliver_one(campaign, message_id, fields)
        finally:
            keeper.cancel()
            self._delivering.discard(mark)

    async def _deliver_one(
        self, campaign: Deliverable, message_id: bytes, fields: dict[bytes, bytes]
    ) -> None:
        rid = fields[b"rid"].decode()
        payload = fields[b"payload"]
        try:
            order = OutboundRequest.decode(payload)
        except (ValueError, KeyError):
            log.error("order %s of %s is unreadable; dead-lettering it", message_id, rid)
            release = partial(campaign.settle.release_refused, rid, "unreadable order", payload)
            if await self._settle(rid, release):
                await self._ack(campaign, message_id)
            return
        while not self.stopping.is_set():
            # a reload replaces the campaign and its backend: each attempt takes the current
            current = self.campaigns().get(campaign.key)
            if current is None:
                return  # removed by a reload: the order waits, unacked, for its return
            try:
                if await self._attempt(current, rid, order, payload):
                    await self._ack(current, message_id)
                    return
            except StorageError as exc:
                log.debug("delivery of %s paused: %s", rid, exc)
                await asyncio.sleep(SETTLE_RETRY)

    async def _attempt(
        self, campaign: Deliverable, rid: str, order: OutboundRequest, payload: bytes
    ) -> bool:
        """One delivery; True when the order is settled (or was already) and can be acked."""
        record = await campaign.store.reservation(rid)
        if record is None or record.state != State.RESERVED:
            return True
        if not await self._take_slot(campaign, rid):
            # someone else is delivering it right now; look again a little later
            await asyncio.sleep(random.uniform(*SLOT_WAIT))
            return False
        unsent = timed_out = False
        try:
            reply, failure, timed_out = await self._send(campaign, _numbered(order, record))
        except _Unsent:
            unsent = True
        finally:
            await self._give_slot(campaign, rid, linger=timed_out)
        if unsent:  # the slot is free for others while this one waits
            await asyncio.sleep(campaign.settings.retry_backoff)
            return False
        if reply is not None and accepted(reply.status):
            self.results[(campaign.id, "accepted")] += 1
            return await self._settle(rid, partial(campaign.settle.commit_accepted, rid, reply))
        if reply is not None and reply.status < 500 and reply.status not in NOT_A_DECISION:
            self.results[(campaign.id, "refused")] += 1
            reason = f"upstream answered {reply.status}"
            if not await self._settle(rid, partial(campaign.settle.release_refused, rid, reason)):
                return False
            await campaign.settle.keep_reply(rid, reply)  # the buyer polls for the backend's reason
            return True
        self.results[(campaign.id, "failed")] += 1
        attempts = await campaign.store.count_attempt(rid)  # failed deliveries
        s = campaign.settings
        if attempts >= s.max_attempts and not self.stopping.is_set():
            reason = f"dead-lettered after {attempts} failed deliveries: {failure}"
            release = partial(campaign.settle.release_refused, rid, reason, payload)
            if not await self._settle(rid, release):
                return False
            self.results[(campaign.id, "dead-lettered")] += 1
            log.error("order %s: %s", rid, reason)
            return True
        await asyncio.sleep(min(s.retry_backoff * 2 ** (attempts - 1), s.max_retry_backoff))
        return False

    async def _settle(self, rid: str, settle: Callable[[], Awaitable[None]]) -> bool:
        """Tell Redis a delivery's outcome, retrying until it is told or the dispatcher
        stops (False: the order stays unacked, so it is delivered again later)."""
        while True:
            try:
                await settle()
                return True
            except StorageError as exc:
                if self.stopping.is_set():
                    return False
                _trouble.log(
                    logging.WARNING, "settle", "settling %s failed (%s); trying again", rid, exc
                )
                await asyncio.sleep(SETTLE_RETRY)

    async def _send(
        self, campaign: Deliverable, order: OutboundRequest
    ) -> tuple[UpstreamReply | None, str, bool]:
        """The backend's answer (None if it failed), why not, and whether it timed out."""
        try:
            reply = await campaign.upstream.send(order)
        except UpstreamError as exc:
            return None, str(exc), exc.timed_out
        except Exception as exc:  # a fault here, not the backend's: try again later
            _trouble.log(
                logging.ERROR,
                "send",
                "delivery to %s failed in this process; retrying",
                campaign.settings.upstream,
                exc_info=True,
            )
            raise _Unsent from exc
        return reply, f"upstream answered {reply.status}", False

    async def _take_slot(self, campaign: Deliverable, rid: str) -> bool:
        ttl_ms = round(1000 * (campaign.upstream.settings.timeout + 5))
        while True:
            taken = await campaign.store.delivery_slot(
                "take", rid, campaign.settings.max_inflight, ttl_ms
            )
            if taken != 0:
                return taken == 1
            await asyncio.sleep(random.uniform(*SLOT_WAIT))

    async def _give_slot(self, campaign: Deliverable, rid: str, *, linger: bool = False) -> None:
        """Free the slot; after a timeout (``linger``) its place stays taken for one more
        timeout, as the backend may still be working on the request."""
        timeout_ms = round(1000 * campaign.upstream.settings.timeout)
        with contextlib.suppress(StorageError):  # it frees itself after its ttl
            await campaign.store.delivery_slot("linger" if linger else "give", rid, 0, timeout_ms)

    async def _keep(self, campaign: Deliverable, message_id: bytes) -> None:
        """While this process works on an order (sending, backing off, waiting for a
        slot), reset its idle time now and then, so that other dispatchers do not claim
        it as a dead one's."""
        while True:
            await asyncio.sleep(KEEP_EVERY)
            with contextlib.suppress(StorageError):
                await campaign.store.keep_order(GROUP, self.consumer, message_id)

    async def _ack(self, campaign: Deliverable, message_id: bytes) -> None:
        """Done with an order (unacked, it would be claimed and found settled)."""
        with contextlib.suppress(StorageError):
            await campaign.store.drop_order(GROUP, message_id)
