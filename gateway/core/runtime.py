"""The composition root of one gateway process: it opens the Redis clients and the
backends, builds the snapshot and every component from its narrow parts, runs the
background loops, and closes it all together.

Nothing but this module and the process layer knows the Runtime: components get the
store, the upstream, the holder, the spawn callable they need. A reload builds a new
snapshot here (``apply``) and swaps it in one assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from functools import partial
from typing import Any

from gateway.admission.identity import identity_for
from gateway.admission.room import RoomMemory, WaitingRoom, run_rooms
from gateway.admission.shaping import Shaper
from gateway.config import CampaignSettings, CartSettings, Settings, UpstreamSettings
from gateway.core.accesslog import AccessLog
from gateway.core.campaigns import Campaign, Shard, queue_store_for, stores_for
from gateway.core.carts import Cart, CartSweep, cart_store_for
from gateway.core.health import Readiness
from gateway.core.heartbeat import Heartbeat
from gateway.core.publisher import Publisher
from gateway.core.rebalancer import Rebalancer
from gateway.core.reload import Reloaded, Reloader
from gateway.core.snapshot import Snapshot, SnapshotHolder
from gateway.core.stockwatch import StockWatch
from gateway.core.sweeper import CampaignSweep, Sweepable, Sweeper
from gateway.forwarding.delivery import Deliverable, Dispatcher, ensure_group
from gateway.forwarding.settle import Settlement
from gateway.forwarding.upstream import Upstream
from limiter.connection import close, connect
from limiter.errors import CampaignMissing, StorageError
from limiter.guard import RedisGuard
from limiter.keys import CampaignKeys, processes_key
from limiter.logs import Throttled
from limiter.notices import Notices
from limiter.pipeline import AutoPipeline, Durability
from limiter.records import Figures
from limiter.reserving import reserve_batcher
from limiter.scripts import Scripts
from limiter.store import CampaignStore
from limiter.topology import topology_for

log = logging.getLogger(__name__)
throttled = Throttled(log, every=60.0)

PREPARE_RETRY = 1.0


class Runtime:
    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        *,
        dispatch: bool = True,
        config_path: str | None = None,
        respawned: bool = False,
    ) -> None:
        #: Campaigns this process must find in Redis, never create: a worker the
        #: supervisor started in place of a dead one, whose siblings created them. Should
        #: Redis have lost them meanwhile, recreating would put the full stock on sale again.
        self.must_exist = {c.id for c in settings.campaigns} if respawned else set()
        r = settings.redis
        self.topology = topology_for(
            redis_url, timeout=r.timeout, sentinel_password=r.sentinel_password
        )
        self.redis = connect(
            redis_url, self.topology, max_connections=r.max_connections, timeout=r.timeout
        )
        self.scripts = Scripts.read()
        self.guard = RedisGuard(r.timeout)
        durability = Durability(
            r.wait_for_replicas, round(r.replica_timeout * 1000), aof=r.wait_for_aof
        )
        self.pipe = AutoPipeline(self.topology, self.guard, durability=durability)
        self.watch = StockWatch(Notices(self.topology, self.redis, interval=0.25), self.pipe)
        self.sweeper = Sweeper(self.sweepables, f"sweeper@{socket.gethostname()}:{os.getpid()}")
        self.watch.on_due = self.sweeper.announced
        self.watch.on_resync = self.sweeper.resync
        self.rebalancer = Rebalancer(
            lambda: self.live.current.campaigns.values(),
            f"rebalancer@{socket.gethostname()}:{os.getpid()}",
        )
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat = Heartbeat(
            self.pipe,
            self.scripts,
            processes_key(settings.redis.key_prefix),
            self.actor,
            on_count=self._share,
        )
        upstreams = {name: Upstream(name, u) for name, u in settings.upstreams.items()}
        #: What this process knows of each waiting room, kept across reloads.
        self.rooms: dict[str, RoomMemory] = {}
        self.live = SnapshotHolder(self._snapshot(settings, upstreams))
        self.readiness = Readiness(self.live, self.watch, self.pipe)
        self.reloader = Reloader(self.live, self.apply, self.readiness, config_path)
        #: The dispatcher's blocking reads get connections of their own.
        self.dispatcher: Dispatcher | None = None
        if dispatch:
            # no retries: a blocking read that fails must come back, not start again
            blocking = connect(
                redis_url, self.topology, max_connections=64, timeout=r.timeout, retries=0
            )
            self.dispatcher = Dispatcher(
                self.deliverables,
                blocking,
                consumer=self.actor,
                redis_timeout=r.timeout,
            )
        self.publisher = Publisher(
            self.live,
            self.guard,
            self.pipe,
            self.dispatcher.results if self.dispatcher else None,
        )
        self.access = AccessLog(settings.access_log)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._preparing: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        redis_url: str,
        *,
        dispatch: bool = True,
        config_path: str | None = None,
        respawned: bool = False,
    ) -> AsyncIterator[Runtime]:
        runtime = cls(
            settings, redis_url, dispatch=dispatch, config_path=config_path, respawned=respawned
        )
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.stop()

    @property
    def snapshot(self) -> Snapshot:
        return self.live.current

    # --- building a snapshot

    def _snapshot(self, settings: Settings, upstreams: Mapping[str, Upstream]) -> Snapshot:
        return Snapshot.of(
            settings,
            (self._campaign(settings, c, upstreams[c.upstream]) for c in settings.campaigns),
            upstreams,
            identity_for(settings.identity),
            lambda campaigns: (
                self._cart(settings, c, upstreams[c.upstream], campaigns) for c in settings.carts
            ),
        )

    def _cart(
        self,
        settings: Settings,
        cart: CartSettings,
        upstream: Upstream,
        campaigns: Mapping[str, Campaign],
    ) -> Cart:
        return Cart(
            cart,
            upstream,
            cart_store_for(settings, cart, self.pipe, self.scripts),
            {cid: campaigns[cid] for cid in cart.campaigns},
            self.actor,
            self.spawn,
        )

    def _campaign(
        self, settings: Settings, campaign: CampaignSettings, upstream: Upstream
    ) -> Campaign:
        stores = stores_for(settings, campaign, self.pipe, self.scripts)
        shaper = Shaper(
            campaign,
            settings.gateway,
            self.pipe,
            self.scripts,
            stores[0].keys,
            on_sold_out=partial(self.watch.mark_sold_out, campaign.id),
            known_available=(
                partial(self.watch.total_available, campaign.id) if len(stores) > 1 else None
            ),
        )
        shaper.share(self.heartbeat.processes)  # a reload's new shaper has its share at once
        built = Campaign(campaign, upstream, shaper, self._room(settings, campaign))
        built.shards = tuple(
            Shard(
                built,
                index,
                store,
                reserve_batcher(store, self.actor, self.spawn),
                Settlement(store, campaign, self.actor, self.spawn),
                reserve_batcher(store.for_carts(), self.actor, self.spawn),
            )
            for index, store in enumerate(stores)
        )
        return built

    def _room(self, settings: Settings, campaign: CampaignSettings) -> WaitingRoom | None:
        queue = queue_store_for(settings, campaign, self.pipe, self.scripts)
        if queue is None:
            return None
        memory = self.rooms.setdefault(campaign.id, RoomMemory())
        watch, campaign_id = self.watch, campaign.id
        return WaitingRoom(campaign, queue, memory, sold_out=lambda: campaign_id in watch.sold_out)

    def waiting_rooms(self) -> list[WaitingRoom]:
        return [c.room for c in self.live.current.campaigns.values() if c.room is not None]

    async def apply(self, new: Settings) -> Reloaded:
        """Swap in a snapshot built from ``new``: new and changed backends open, changed
        campaigns get new objects (requests in flight keep the old ones), missing
        counters are created; retired backends close once their requests are done."""
        old = self.live.current
        upstreams, retired = await _reuse_or_open(old.upstreams, new.upstreams)
        self.guard.timeout = new.redis.timeout
        self.pipe.durability.replica_timeout_ms = round(new.redis.replica_timeout * 1000)
        self.access.reconfigure(new.access_log)
        self.publisher.flush()  # the old campaigns' counts, before they are replaced
        self.live.current = self._snapshot(new, upstreams)
        self.readiness.initialised &= set(self.live.current.campaigns)
        await self.prepare_or_retry()
        if retired:
            grace = max(u.settings.timeout for u in retired) + 1
            self.spawn(_close_later(retired, grace))
        before, after = set(old.campaigns), set(self.live.current.campaigns)
        return Reloaded(
            added=sorted(after - before),
            removed=sorted(before - after),
            kept=sorted(after & before),
        )

    def _share(self, processes: int) -> None:
        for campaign in self.live.current.campaigns.values():
            campaign.shaper.share(processes)

    def shards(self) -> Iterable[Shard]:
        return [s for c in self.live.current.campaigns.values() for s in c.shards]

    def stores(self) -> Iterable[CampaignStore]:
        return [s.store for s in self.shards()]

    def campaign_keys(self) -> Iterable[CampaignKeys]:
        return [s.store.keys for s in self.shards()]

    def carts(self) -> Iterable[Cart]:
        return self.live.current.carts.values()

    def notice_keys(self) -> Iterable[CampaignKeys]:
        """Whose events channels to follow: every shard's, and every cart's (deadlines)."""
        return [*self.campaign_keys(), *(c.store.keys for c in self.carts())]

    def sweepables(self) -> Iterable[Sweepable]:
        """What has deadlines to keep: every shard of every campaign, every cart."""
        return [
            *(CampaignSweep(s.store) for s in self.shards()),
            *(CartSweep(c) for c in self.carts()),
        ]

    def deliverables(self) -> Mapping[str, Deliverable]:
        """Every shard of every campaign and every cart in force, by key: what
        dispatchers deliver."""
        found: dict[str, Deliverable] = {s.key: s for s in self.shards()}
        found.update((c.key, c) for c in self.carts())
        return found

    # --- running

    async def start(self) -> None:
        await self.pipe.start()
        for upstream in self.live.current.upstreams.values():
            await upstream.open()
        await self.prepare_or_retry()
        self._loops += [
            self.spawn(self.watch.run_poll(self.campaign_keys)),
            self.spawn(self.watch.run_listener(self.notice_keys)),
            self.spawn(self.sweeper.run()),
            self.spawn(self.rebalancer.run()),
            self.spawn(self.heartbeat.run()),
            self.spawn(self._publish_metrics()),
            self.spawn(self.access.run()),
            self.spawn(run_rooms(self.waiting_rooms)),
        ]
        if self.dispatcher is not None:
            self._loops.append(self.spawn(self.dispatcher.run()))

    async def prepare(self) -> None:
        """Load the scripts; create missing campaigns' counters (never resetting existing
        ones) and order queues."""
        await self.pipe.load_scripts(self.scripts.all())
        absent: list[str] = []
        for campaign in self.live.current.campaigns.values():
            if campaign.id in self.readiness.initialised:
                continue
            if campaign.id in self.must_exist:
                try:
                    await campaign.store.figures()
                except CampaignMissing:
                    absent.append(campaign.id)
                    continue
            for shard in campaign.shards:
                create = partial(ensure_group, self.redis, shard.store.keys.orders)
                await self.guard.run(create, "create the order queue")
            await self._create_counters(campaign)
            self.readiness.initialised.add(campaign.id)
        for cart in self.live.current.carts.values():
            create = partial(ensure_group, self.redis, cart.store.keys.orders)
            await self.guard.run(create, "create the cart's order queue")
        await self.watch.poll(self.campaign_keys())
        if absent:
            raise StorageError(
                f"campaign(s) {', '.join(absent)} have no counters in Redis, and this restarted "
                "worker does not recreate them (did Redis lose its data? see docs/operations.md)"
            )

    async def _create_counters(self, campaign: Campaign) -> None:
        """Create the shards' counters, each with its share of the file's stock, unless
        the campaign exists; shard 0 last, so that a start cut short creates what is
        missing next time, while a campaign whose shard 0 exists is never given stock
        again (a missing shard then means Redis lost it)."""
        stock, actor, count = campaign.settings.stock, f"config@{self.actor}", len(campaign.shards)
        kept = await campaign.store.shape()
        if kept is not None and kept != count:
            raise StorageError(
                f"campaign {campaign.id} exists in Redis with {kept} shard(s) and the file "
                f"says {count}: its stock, quotas and records are spread over {kept}; run it "
                "with that many, or sell under a new campaign id",
                maybe_applied=False,
            )
        if kept is not None:
            for shard in campaign.shards[1:]:
                await shard.store.figures()  # CampaignMissing: Redis lost a shard
            figures = await self._totals(campaign)
            if figures.stock_total != stock:
                log.info(
                    "campaign %s already in Redis: kept its stock (total %d, available %d), "
                    "not the file's %d",
                    campaign.id,
                    figures.stock_total,
                    figures.available,
                    stock,
                )
            return
        for shard in reversed(campaign.shards):
            share = stock // count + (1 if shard.index < stock % count else 0)
            await shard.store.create(share, actor, count)
        log.info("campaign %s created with stock %d in %d shard(s)", campaign.id, stock, count)

    async def _totals(self, campaign: Campaign) -> Figures:
        each = [await shard.store.figures() for shard in campaign.shards]
        return Figures(*(sum(column) for column in zip(*each, strict=True)))

    async def prepare_or_retry(self) -> None:
        """Prepare now, or keep trying in the background (answering 503 meanwhile)."""
        try:
            await self.prepare()
        except StorageError as exc:
            log.error("redis is not usable yet (%s); retrying, answering 503 meanwhile", exc)
            if self._preparing is None or self._preparing.done():
                self._preparing = self.spawn(self._prepare_until_done())
                self._loops.append(self._preparing)

    async def _prepare_until_done(self) -> None:
        while not self.readiness.initialised_all:
            await asyncio.sleep(PREPARE_RETRY)
            try:
                await self.prepare()
            except StorageError as exc:
                log.debug("redis still not usable: %s", exc)
        log.info("redis usable again; all campaigns initialised")

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.publisher.flush()
            except Exception:  # a metrics bug must not stop the publishing for good
                throttled.log(logging.ERROR, "publish", "publishing metrics failed", exc_info=True)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` in the background until it ends or the runtime stops."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def stop_background(self) -> None:
        """Stop the periodic work: polling, listening, sweeping, heartbeats, dispatching."""
        if self.dispatcher is not None:
            self.dispatcher.stopping.set()
        for loop_task in self._loops:
            loop_task.cancel()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the loops, give settling work (commits, releases) ``grace`` seconds, then close."""
        self.stop_background()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace
        campaigns = self.live.current.campaigns.values()
        shards = [s for c in campaigns for s in c.shards]
        await asyncio.gather(
            *(s.batcher.close(grace) for s in shards),
            *(s.settle.close(grace) for s in shards),
        )
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, give_up - loop.time()))
            for task in late:
                log.warning("stopping: cancelling %s after %gs", task.get_coro(), grace)
                task.cancel()
        if self._tasks:  # a task that ignores its cancellation must not hang the exit
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for upstream in self.live.current.upstreams.values():
            await upstream.close()
        await self.watch.close()
        await self.pipe.close()
        self.guard.close()
        for client in [self.redis] + ([self.dispatcher.redis] if self.dispatcher else []):
            await close(client)


async def _reuse_or_open(
    current: Mapping[str, Upstream], wanted: Mapping[str, UpstreamSettings]
) -> tuple[dict[str, Upstream], list[Upstream]]:
    """Backends for ``wanted``: unchanged ones kept, new and changed ones opened; and
    the ones to close once their requests end."""
    upstreams: dict[str, Upstream] = {}
    for name, settings in wanted.items():
        kept = current.get(name)
        if kept is not None and kept.settings == settings:
            upstreams[name] = kept
        else:
            upstreams[name] = Upstream(name, settings)
            await upstreams[name].open()
    in_use = {id(u) for u in upstreams.values()}
    return upstreams, [u for u in current.values() if id(u) not in in_use]


async def _close_later(upstreams: list[Upstream], grace: float) -> None:
    await asyncio.sleep(grace)
    for upstream in upstreams:
        await upstream.close()
