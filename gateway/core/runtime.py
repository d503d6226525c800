"""Everything one gateway process holds while it runs, opened and closed together:
the Redis pool and scripts, the campaigns, the backends, the background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine, Iterable
from functools import partial
from typing import Any

from gateway.admission.identity import Identity, identity_for
from gateway.admission.shaping import Shaper
from gateway.config import CampaignSettings, Settings
from gateway.core.accesslog import AccessLog
from gateway.core.campaigns import Campaign, Registry
from gateway.core.publisher import Publisher
from gateway.core.stockwatch import StockWatch
from gateway.core.sweeper import run_sweeper
from gateway.forwarding.delivery import Dispatcher, ensure_group
from gateway.forwarding.upstream import Upstream
from gateway.process.supervisor import RESPAWNED_ENV
from limiter.connection import connect
from limiter.errors import CampaignMissing, StorageError
from limiter.guard import RedisGuard
from limiter.keys import CampaignKeys, processes_key
from limiter.logs import Throttled
from limiter.pipeline import AutoPipeline
from limiter.reserving import reserve_batcher
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy

log = logging.getLogger(__name__)
throttled = Throttled(log, every=60.0)

SWEEP_INTERVAL = 1.0
PREPARE_RETRY = 1.0
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_TTL_MS = 5000


def campaign_store(
    settings: Settings, campaign: CampaignSettings, pipe: AutoPipeline, scripts: Scripts
) -> CampaignStore:
    policy = StorePolicy(
        per_user_limit=campaign.per_user_limit,
        # sync: the backend's answer settles it; queue: the 202 hands the order over
        reserve_deadline_ms=round(campaign.forward_deadline * 1000),
        ledger_max_length=settings.ledger.max_length,
        mode=campaign.forward,
    )
    keys = CampaignKeys(campaign.id, settings.redis.key_prefix)
    return CampaignStore(pipe, scripts, keys, policy)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        *,
        dispatch: bool = True,
        config_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        #: Campaigns this process must find in Redis, never create: a worker the
        #: supervisor started in place of a dead one, whose siblings created them. Should
        #: Redis have lost them meanwhile, recreating would put the full stock on sale again.
        self.must_exist = (
            {c.id for c in settings.campaigns} if os.environ.get(RESPAWNED_ENV) else set()
        )
        #: The file a reload reads (None: settings given in code, nothing to reload).
        self.config_path = config_path
        self.redis = connect(
            redis_url,
            max_connections=settings.redis.max_connections,
            timeout=settings.redis.timeout,
        )
        #: The dispatcher's blocking reads get connections of their own.
        self.dispatcher: Dispatcher | None = None
        if dispatch:
            # no retries: a blocking read that fails must come back, not start again
            blocking = connect(
                redis_url, max_connections=64, timeout=settings.redis.timeout, retries=0
            )
            self.dispatcher = Dispatcher(self, blocking)
        self.scripts = Scripts.register(self.redis)
        self.guard = RedisGuard(settings.redis.timeout)
        self.pipe = AutoPipeline(
            self.redis,
            self.guard,
            replicas=settings.redis.wait_for_replicas,
            replica_timeout_ms=round(settings.redis.replica_timeout * 1000),
        )
        self.watch = StockWatch(self.redis, self.pipe)
        self.upstreams = {name: Upstream(name, u) for name, u in settings.upstreams.items()}
        self.identity: Identity = identity_for(settings.identity)
        self.max_body = settings.gateway.max_body_bytes
        self.body_timeout = settings.gateway.body_timeout
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.publisher = Publisher(self)
        self.access = AccessLog(settings.access_log)
        #: Gateway processes sharing this Redis, as last counted.
        self.processes = 1
        self.registry = Registry.of(self.build_campaign(c) for c in settings.campaigns)
        #: Why the last reload was refused (None after a good one).
        self.reload_error: str | None = None
        #: Held while a reload applies: reloads run one after another.
        self.reloading = asyncio.Lock()
        #: Set on SIGTERM: readiness fails while requests in flight finish.
        self.draining = False
        #: Campaigns whose counters are known to exist in Redis.
        self.initialised: set[str] = set()
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
    ) -> AsyncIterator[Runtime]:
        runtime = cls(settings, redis_url, dispatch=dispatch, config_path=config_path)
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.stop()

    @property
    def ready(self) -> bool:
        return self.initialised >= self.registry.by_id.keys()

    def build_campaign(self, settings: CampaignSettings) -> Campaign:
        store = campaign_store(self.settings, settings, self.pipe, self.scripts)
        keys = store.keys
        batcher = reserve_batcher(store, self.actor, self.spawn)
        shaper = Shaper(
            settings,
            self.settings.gateway,
            self.pipe,
            self.scripts,
            keys,
            on_sold_out=partial(self.watch.mark_sold_out, settings.id),
        )
        shaper.share(self.processes)  # a reload's new shaper falls back to its share at once
        return Campaign(settings, store, batcher, self.upstreams[settings.upstream], shaper)

    def stores(self) -> Iterable[CampaignStore]:
        return [c.store for c in self.registry.by_id.values()]

    def campaign_keys(self) -> Iterable[CampaignKeys]:
        return [c.store.keys for c in self.registry.by_id.values()]

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.open()
        await self.prepare_or_retry()
        self._loops += [
            self.spawn(self.watch.run_poll(self.campaign_keys)),
            self.spawn(self.watch.run_listener(self.campaign_keys)),
            self.spawn(run_sweeper(self.stores, f"sweeper@{self.actor}", SWEEP_INTERVAL)),
            self.spawn(self._heartbeat()),
            self.spawn(self._publish_metrics()),
            self.spawn(self.access.run()),
        ]
        if self.dispatcher is not None:
            self._loops.append(self.spawn(self.dispatcher.run()))

    async def prepare(self) -> None:
        """Load the scripts; create missing campaigns' counters (never resetting existing
        ones) and order queues."""
        await self.guard.run(lambda: self.scripts.load(self.redis), "load scripts")
        absent: list[str] = []
        for campaign in self.registry.by_id.values():
            if campaign.id in self.initialised:
                continue
            if campaign.id in self.must_exist:
                try:
                    await campaign.store.figures()
                except CampaignMissing:
                    absent.append(campaign.id)
                    continue
            create = partial(ensure_group, self.redis, campaign.store.keys.orders)
            await self.guard.run(create, "create the order queue")
            created, figures = await campaign.store.init(
                campaign.settings.stock, f"config@{self.actor}"
            )
            if created:
                log.info("campaign %s created with stock %d", campaign.id, figures.stock_total)
            elif figures.stock_total != campaign.settings.stock:
                log.info(
                    "campaign %s already in Redis: kept its stock (total %d, available %d), "
                    "not the file's %d",
                    campaign.id,
                    figures.stock_total,
                    figures.available,
                    campaign.settings.stock,
                )
            self.initialised.add(campaign.id)
        await self.watch.poll(self.campaign_keys())
        if absent:
            raise StorageError(
                f"campaign(s) {', '.join(absent)} have no counters in Redis, and this restarted "
                "worker does not recreate them (did Redis lose its data? see docs/operations.md)"
            )

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
        while not self.ready:
            await asyncio.sleep(PREPARE_RETRY)
            try:
                await self.prepare()
            except StorageError as exc:
                log.debug("redis still not usable: %s", exc)
        log.info("redis usable again; all campaigns initialised")

    async def _heartbeat(self) -> None:
        """Count live processes, so limits can fall back to a fair local share."""
        key = processes_key(self.settings.redis.key_prefix)
        while True:
            try:
                alive = await self.pipe.script(
                    self.scripts.heartbeat, [key], [self.actor, HEARTBEAT_TTL_MS], "heartbeat"
                )
                self.processes = int(alive)
                for campaign in self.registry.by_id.values():
                    campaign.shaper.share(self.processes)
            except StorageError as exc:
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

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
        await asyncio.gather(*(c.batcher.close(grace) for c in self.registry.by_id.values()))
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, give_up - loop.time()))
            for task in late:
                log.warning("stopping: cancelling %s after %gs", task.get_coro(), grace)
                task.cancel()
        if self._tasks:  # a task that ignores its cancellation must not hang the exit
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for upstream in self.upstreams.values():
            await upstream.close()
        await self.pipe.close()
        self.guard.close()
        clients = [self.redis] + ([self.dispatcher.redis] if self.dispatcher else [])
        for client in clients:
            await client.aclose()
            await client.connection_pool.disconnect()
