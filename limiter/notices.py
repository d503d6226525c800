"""Following the campaigns' notice channels (sold out, restock) wherever they are
published: on one server or a Sentinel primary with SUBSCRIBE on the redis-py
client; on a Redis Cluster with SSUBSCRIBE on each node that owns some of the
channels' slots, as the slot map says (a slot that moves, or a node that fails
over, moves its channels' subscription with it).

Notices are the fast path only: the stock poll reads every counter a few times a
second, so a notice lost while a subscription moves costs a poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from limiter.connection import RedisClient
from limiter.topology import Address, Topology

log = logging.getLogger(__name__)

#: Called with the channel and the notice.
Notice = Callable[[str, bytes], None]
Channels = Callable[[], Iterable[str]]
#: Called after each (re)subscription: notices published meanwhile were missed.
Subscribed = Callable[[], None]


class Notices:
    def __init__(self, topology: Topology, client: RedisClient, *, interval: float) -> None:
        self.topology = topology
        self.client = client
        self.interval = interval
        self._subscribed: Subscribed = lambda: None

    async def follow(
        self, channels: Channels, notice: Notice, subscribed: Subscribed = lambda: None
    ) -> None:
        """Deliver every notice on ``channels`` (read again each ``interval``, so a
        reload's campaigns are followed) until cancelled; reconnects after errors, and
        calls ``subscribed`` after each new subscription."""
        self._subscribed = subscribed
        while True:
            try:
                if self.topology.sharded:
                    await self._follow_shards(channels, notice)
                else:
                    await self._follow_one(self._pubsub(None), channels, notice, sharded=False)
            except (RedisError, OSError) as exc:
                log.debug("notices listener reconnecting: %s", exc)
                await asyncio.sleep(self.interval)

    def _pubsub(self, address: Address | None) -> PubSub:
        if address is None:
            assert isinstance(self.client, Redis)
            return self.client.pubsub(ignore_subscribe_messages=True)
        return self.topology.options.client(address).pubsub(ignore_subscribe_messages=True)

    async def _follow_one(
        self, pubsub: PubSub, channels: Channels, notice: Notice, *, sharded: bool
    ) -> None:
        subscribed: set[str] = set()
        try:
            while True:
                wanted = set(channels())
                if wanted != subscribed:
                    await _resubscribe(pubsub, subscribed, wanted, sharded)
                    if wanted - subscribed:
                        self._subscribed()
                    subscribed = wanted
                if not subscribed:
                    await asyncio.sleep(self.interval)
                    continue
                message = await pubsub.get_message(timeout=self.interval)
                if message and message["type"] in ("message", "smessage"):
                    notice(message["channel"].decode(), message["data"])
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            if sharded and pubsub.connection_pool is not None:
                await pubsub.connection_pool.disconnect()

    async def _follow_shards(self, channels: Channels, notice: Notice) -> None:
        """One listener per node, for the channels whose slot it owns; all of them
        started again when that assignment changes."""
        listeners: dict[Address, asyncio.Task[None]] = {}
        owners: dict[Address, frozenset[str]] = {}
        try:
            while True:
                wanted = _by_owner(self.topology, channels())
                if wanted != owners:
                    for task in listeners.values():
                        task.cancel()
                    owners, listeners = (
                        wanted,
                        {
                            node: asyncio.ensure_future(self._follow_node(node, mine, notice))
                            for node, mine in wanted.items()
                        },
                    )
                await asyncio.sleep(self.interval)
        finally:
            for task in listeners.values():
                task.cancel()
            await asyncio.gather(*listeners.values(), return_exceptions=True)

    async def _follow_node(self, node: Address, channels: frozenset[str], notice: Notice) -> None:
        while True:
            try:
                await self._follow_one(self._pubsub(node), lambda: channels, notice, sharded=True)
            except (RedisError, OSError) as exc:
                log.debug("notices listener on %s reconnecting: %s", node, exc)
                self.topology.failed(node)
                await asyncio.sleep(self.interval)


def _by_owner(topology: Topology, channels: Iterable[str]) -> dict[Address, frozenset[str]]:
    owned: dict[Address, set[str]] = {}
    for channel in channels:
        owner = topology.address(channel)
        if owner is not None:
            owned.setdefault(owner, set()).add(channel)
    return {node: frozenset(mine) for node, mine in owned.items()}


async def _resubscribe(pubsub: PubSub, old: set[str], new: set[str], sharded: bool) -> None:
    gone, added = sorted(old - new), sorted(new - old)
    if sharded:  # one slot per SSUBSCRIBE: a node may own the slots of many campaigns
        for channel in gone:
            await pubsub.sunsubscribe(channel)
        for channel in added:
            await pubsub.ssubscribe(channel)
        return
    if gone:
        await pubsub.unsubscribe(*gone)
    if added:
        await pubsub.subscribe(*added)
