"""The scenarios of ``flashgate bench``: which systems each compares, under what load.

Every request carries an Idempotency-Key of its own by default (``--keyed-share``)
and comes from a buyer drawn from a population of distinct users, in every run and
with either generator. Scenarios:

* ``oversubscribed``: stock = 1 % of the requests, 256 connections: naive (the
  full reserve script per request), deduct-only (one counter per request) and
  flashgate, each sale checked for correctness; Redis round trips and script calls
  per winner;
* ``sold-out``: every request after the sale: flashgate against aiohttp's
  low-level ``web.Server`` answering the same fixed 409 (and, for information, an
  ordinary Application); Redis commands per request net of the background;
* ``everyone-wins``: stock for everyone, winners forwarded to the stub backend:
  flashgate against deduct-only; round trips and script calls per winner;
* ``round-trips``: the oversubscribed sale's figures (kept as a name);
* ``latency``: the p99 flashgate adds over calling the backend directly, paced at
  ``--latency-rate`` winners/s (the target), and at half and a tenth of the
  saturated rate (information);
* ``workers``: the sold-out path with ``--workers 2`` against one worker;
* ``access-log``: the sold-out path logging every refusal against not logging;
* ``idle``: Redis commands a second and CPU per process of a gateway nobody buys
  from, with 1, 100 and 1,000 campaigns (``idle.py``);
* ``replicas``: flashgate with ``redis.wait_for_replicas: 0`` against ``1`` on a
  primary with replicas (``--redis`` if given, else a Sentinel topology of the
  bench's own), in an oversubscribed sale and with everyone winning.
* ``waiting-room``: a waiting room's polls against the sold-out path, Redis commands
  per poll, passes issued against ``admit_rate`` (``waiting_room.py``).
* ``shards``: the oversubscribed sale with ``shards: 1`` against ``shards: 6`` on a
  Redis Cluster (``--redis`` if it is one, else three primaries of the bench's
  own), each primary's script time; then reserve.lua driven on the cluster's nodes
  without a gateway, one node against all (``shards.py``).

``SCENARIO_RUNS`` maps each name (``gateway/bench/__init__.py`` lists them for the
CLI) to its coroutine; a new scenario is a method, a line there, and its name there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from gateway.bench import SCENARIOS, waiting_room
from gateway.bench.crowd import Crowd, Tally, run_crowd
from gateway.bench.datastore import Datastore, sentinel
from gateway.bench.idle import measure_idle
from gateway.bench.measure import Run, background_rate, counter_books, reservation_books
from gateway.bench.options import Options
from gateway.bench.shards import SALE as SHARDS_SALE
from gateway.bench.shards import SALES, by_node, clustered, redis_side, sharded_flashgate
from gateway.bench.systems import (
    CAMPAIGN,
    PATH,
    ROUND_TRIPS,
    Served,
    System,
    flashgate,
    gauge,
    reference,
    scrape,
    seed_campaign,
    seed_counter,
)
from gateway.bench.wrk import available as wrk_available
from gateway.bench.wrk import run_wrk
from gateway.operations.terminal import Progress
from limiter.keys import CampaignKeys

#: Stock (and per-user limit) so large that everyone wins.
EVERYONE = 10**9
EVERYONE_WINS = "everyone-wins"
#: The latency comparisons: the target's fixed rate, then half and a tenth of the
#: saturated rate.
FIXED_RATE = "latency at a fixed rate"
HALF_RATE = "latency at half the saturated rate"
TENTH_RATE = "latency at a tenth"
REPLICAS_SALE = "replicas: oversubscribed"
REPLICAS_EVERYONE = "replicas: everyone-wins"
#: The gateway publishes its counters every second.
PUBLISH_WAIT = 1.2

#: One run of a system: (its name, the system, where it serves) -> what was measured.
Load = Callable[[str, System, Served], Awaitable[Run]]
#: scenario -> system -> one Run per round
Runs = dict[str, dict[str, list[Run]]]


class Bench:
    def __init__(
        self, options: Options, store: Datastore, backend: str, runs: Runs | None = None
    ) -> None:
        self.options = options
        self.store = store
        self.backend = backend
        self.runs: Runs = {} if runs is None else runs
        #: The idle scenario's figures, once measured.
        self.idle: dict[str, Any] | None = None

    async def run(self) -> None:
        """The chosen scenarios, in the order of SCENARIOS (each once)."""
        done: set[Callable[[Bench], Awaitable[None]]] = set()
        for name in SCENARIOS:
            scenario = SCENARIO_RUNS[name]
            if name in self.options.scenarios and scenario not in done:
                done.add(scenario)
                await scenario(self)

    async def fresh(self) -> None:
        await self.store.flush()
        await asyncio.to_thread(_post, f"{self.backend}/_reset")

    async def compare(self, scenario: str, systems: dict[str, System], load: Load) -> None:
        """Every system, round after round, each time from a fresh Redis and backend:
        alternating them spreads the machine's noise over all of them alike."""
        runs = self.runs.setdefault(scenario, {})
        for _ in range(self.options.rounds):
            for name, system in systems.items():
                await self.fresh()
                with system.start() as served:
                    runs.setdefault(name, []).append(await load(name, system, served))

    # --- systems

    def flashgate(self, stock: int, *, per_user_limit: int = 1, **config: Any) -> System:
        start = functools.partial(
            flashgate,
            self.store.url,
            self.backend,
            stock,
            per_user_limit=per_user_limit,
            **config,
        )

        async def check(tally: Tally, sells_out: bool) -> dict[str, Any]:
            return await reservation_books(
                self.store.campaign,
                self.backend,
                tally,
                per_user_limit=per_user_limit,
                sells_out=sells_out,
            )

        return System(start, check)

    def naive(self, stock: int) -> System:
        """The full reserve script per request, on the campaign's data node."""
        node = self.store.campaign_node

        @contextlib.contextmanager
        def start() -> Iterator[Served]:
            extra = ("--redis", node, "--upstream", self.backend, "--campaign", CAMPAIGN)
            with reference("naive", *extra) as served:
                seed_campaign(node, stock)
                yield served

        async def check(tally: Tally, sells_out: bool) -> dict[str, Any]:
            return await reservation_books(
                self.store.campaign, self.backend, tally, per_user_limit=1, sells_out=sells_out
            )

        return System(start, check)

    def deduct_only(self, stock: int) -> System:
        """One counter, checked and decremented by one script call per request."""
        node = self.store.campaign_node

        @contextlib.contextmanager
        def start() -> Iterator[Served]:
            with reference("deduct-only", "--redis", node, "--campaign", CAMPAIGN) as served:
                seed_counter(node, stock)
                yield served

        async def check(tally: Tally, sells_out: bool) -> dict[str, Any]:
            return await counter_books(self.store.campaign, tally, stock=stock, sells_out=sells_out)

        return System(start, check)

    def plain(self, kind: str) -> System:
        """A server that sells nothing (hello, fixed-409)."""
        return System(functools.partial(reference, kind))

    def backend_direct(self) -> System:
        @contextlib.contextmanager
        def start() -> Iterator[Served]:
            yield Served(int(self.backend.rsplit(":", 1)[1]))

        return System(start)

    # --- loads

    def sale(self, requests: int) -> Load:
        """A sale of ``requests`` requests meant to sell out, checked for correctness."""

        async def load(name: str, system: System, served: Served) -> Run:
            def drive() -> Awaitable[Tally]:
                return self.crowd(f"{name}: sale", served.port, requests=requests)

            return await self.measure(name, system, served, drive, sells_out=True, trips=True)

        return load

    def timed(
        self,
        *,
        rate: float | None = None,
        throughput_only: bool = False,
        background: bool = False,
        sells_out: bool | None = None,
        trips: bool = False,
    ) -> Load:
        """A run of ``--seconds``: paced at ``rate``, or as fast as answers come back; a
        ``throughput_only`` run goes to wrk when the options allow it (see wrk.py).
        ``sells_out`` (True or False): check the books after it."""
        use_wrk = throughput_only and rate is None and wants_wrk(self.options.generator)
        seconds = self.options.seconds

        async def load(name: str, system: System, served: Served) -> Run:
            def drive() -> Awaitable[Tally]:
                if use_wrk:
                    return self.wrk(served.port, seconds)
                concurrency = 64 if rate else None
                return self.crowd(
                    name, served.port, seconds=seconds, rate=rate, concurrency=concurrency
                )

            return await self.measure(
                name,
                system,
                served,
                drive,
                generator="wrk" if use_wrk else "crowd",
                background=background,
                sells_out=sells_out,
                trips=trips,
            )

        return load

    async def measure(
        self,
        name: str,
        system: System,
        served: Served,
        drive: Callable[[], Awaitable[Tally]],
        *,
        generator: str = "crowd",
        background: bool = False,
        sells_out: bool | None = None,
        trips: bool = False,
    ) -> Run:
        """Redis's commands over ``drive()``; the background rate before it, the books
        and flashgate's round trips after it, when asked."""
        quiet = await background_rate(self.store) if background else None
        metrics = await asyncio.to_thread(scrape, served.admin) if trips and served.admin else None
        before = await self.store.commands()  # a scrape reads Redis: it comes first
        tally = await drive()
        commands = await self.store.commands() - before
        run = Run(name, tally, commands, generator, background=quiet)
        run.sells, run.redis = system.check is not None, self.store.description
        if sells_out is not None and system.check is not None:
            run.verdict = await system.check(tally, sells_out)
        if metrics is not None and served.admin is not None:
            await asyncio.sleep(PUBLISH_WAIT)
            after = await asyncio.to_thread(scrape, served.admin)
            run.round_trips = gauge(after, ROUND_TRIPS) - gauge(metrics, ROUND_TRIPS)
            state = CampaignKeys(CAMPAIGN).state
            run.decided = int(await self.store.campaign.hget(state, "decided") or 0)
        return run

    async def crowd(
        self,
        label: str,
        port: int,
        *,
        requests: int | None = None,
        seconds: float | None = None,
        rate: float | None = None,
        concurrency: int | None = None,
    ) -> Tally:
        return await crowd_run(
            label,
            port,
            self.options,
            requests=requests,
            seconds=seconds,
            rate=rate,
            concurrency=concurrency,
        )

    async def wrk(self, port: int, seconds: float) -> Tally:
        return await run_wrk(
            f"http://127.0.0.1:{port}{PATH}",
            seconds=seconds,
            concurrency=self.options.concurrency,
            buyers=self.options.buyers_for(None),
            keyed_share=self.options.keyed_share,
        )

    # --- scenarios

    def sale_stock(self) -> int:
        """The oversubscribed sale's stock: --stock, or 1 % of its requests."""
        return self.options.stock or max(1, self.options.requests // 100)

    async def oversubscribed(self) -> None:
        stock = self.sale_stock()
        systems = {
            "naive": self.naive(stock),
            "deduct-only": self.deduct_only(stock),
            "flashgate": self.flashgate(stock),
        }
        await self.compare("oversubscribed", systems, self.sale(self.options.requests))

    async def sold_out(self) -> None:
        systems = {
            "hello": self.plain("hello"),
            "fixed 409": self.plain("fixed-409"),
            "flashgate": self.flashgate(stock=0),
        }
        await self.compare("sold-out", systems, self.timed(throughput_only=True, background=True))

    async def everyone_wins(self) -> None:
        systems = {
            "deduct-only": self.deduct_only(EVERYONE),
            "flashgate": self.flashgate(EVERYONE, per_user_limit=EVERYONE),
        }
        await self.compare(EVERYONE_WINS, systems, self.timed(sells_out=False, trips=True))

    async def latency(self) -> None:
        """Paced at the target's fixed rate, then at half and a tenth of the saturated
        rate (everyone-wins' flashgate runs, or a saturated run of its own)."""
        everyone = self.flashgate(EVERYONE, per_user_limit=EVERYONE)
        systems = {"flashgate": everyone, "direct": self.backend_direct()}
        await self.compare(FIXED_RATE, systems, self.timed(rate=self.options.latency_rate))
        if EVERYONE_WINS not in self.runs:
            await self.compare("saturated", {"flashgate": everyone}, self.timed())
        source = self.runs.get(EVERYONE_WINS) or self.runs["saturated"]
        saturated = statistics.median(r.tally.rate for r in source["flashgate"])
        for scenario, share in ((HALF_RATE, 0.5), (TENTH_RATE, 0.1)):
            await self.compare(scenario, systems, self.timed(rate=saturated * share))

    async def workers(self) -> None:
        systems = {
            "workers=1": self.flashgate(stock=0),
            "workers=2": self.flashgate(stock=0, workers=2),
        }
        await self.compare("workers", systems, self.timed(throughput_only=True, background=True))

    async def access_log(self) -> None:
        systems = {
            "not logging refusals": self.flashgate(stock=0),
            "logging every refusal": self.flashgate(stock=0, local_refusals=True),
        }
        load = self.timed(throughput_only=True, background=True)
        await self.compare("access-log", systems, load)

    async def idle_cost(self) -> None:
        """Nobody buying, by catalogue size (idle.py): its figures are not runs."""
        self.idle = await measure_idle(self.options, self.store, self.backend, self.fresh)

    async def replicas(self) -> None:
        """wait_for_replicas 0 against 1, selling out and with everyone winning."""
        async with self.replicated() as store:
            other = Bench(self.options, store, self.backend, self.runs)
            sale = {
                f"wait_for_replicas={n}": other.flashgate(self.sale_stock(), wait_for_replicas=n)
                for n in (0, 1)
            }
            await other.compare(REPLICAS_SALE, sale, other.sale(self.options.requests))
            everyone = {
                f"wait_for_replicas={n}": other.flashgate(
                    EVERYONE, per_user_limit=EVERYONE, wait_for_replicas=n
                )
                for n in (0, 1)
            }
            load = other.timed(sells_out=False, trips=True)
            await other.compare(REPLICAS_EVERYONE, everyone, load)

    @contextlib.asynccontextmanager
    async def replicated(self) -> AsyncIterator[Datastore]:
        """--redis (checked for replicas before the bench began), else a Sentinel
        topology started for this scenario."""
        if self.options.redis_url:
            yield self.store
            return
        async with sentinel(CAMPAIGN) as store:
            yield store

    async def waiting_room(self) -> None:
        """Polls of a waiting room against the sold-out path (waiting_room.py)."""
        runs = self.runs.setdefault(waiting_room.SCENARIO, {})
        for _ in range(self.options.rounds):
            await self.fresh()
            measured = await waiting_room.one_round(self.store, self.backend, self.options)
            for name, run in measured.items():
                runs.setdefault(name, []).append(run)

    async def shards(self) -> None:
        """shards: 1 against 6 through flashgate, then the Redis side alone (shards.py)."""
        async with clustered(self.options, self.store) as store:
            other = Bench(self.options, store, self.backend, self.runs)
            stock = other.sale_stock()
            systems = {
                name: sharded_flashgate(store, self.backend, stock, shards)
                for name, shards in SALES.items()
            }
            load = await by_node(store, other.sale(self.options.requests))
            await other.compare(SHARDS_SALE, systems, load)
            await redis_side(self.options, store, self.runs, other.fresh)


SCENARIO_RUNS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "oversubscribed": Bench.oversubscribed,
    "sold-out": Bench.sold_out,
    EVERYONE_WINS: Bench.everyone_wins,
    "round-trips": Bench.oversubscribed,
    "latency": Bench.latency,
    "workers": Bench.workers,
    "access-log": Bench.access_log,
    "idle": Bench.idle_cost,
    "replicas": Bench.replicas,
    "waiting-room": Bench.waiting_room,
    "shards": Bench.shards,
}


async def crowd_run(
    name: str,
    port: int,
    options: Options,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    rate: float | None = None,
    path: str = PATH,
    concurrency: int | None = None,
    host: str = "127.0.0.1",
) -> Tally:
    crowd = Crowd(
        host=host,
        port=port,
        path=path,
        buyers=options.buyers_for(requests),
        concurrency=concurrency or options.concurrency,
        requests=requests,
        duration=seconds,
        rate=rate,
        keyed_share=options.keyed_share,
    )
    progress = Progress(requests or 0, f"{name:<24}", enabled=options.progress and bool(requests))
    tally = await run_crowd(crowd, on_answer=progress.advance if progress.enabled else None)
    progress.close()
    return tally


def wants_wrk(generator: str) -> bool:
    if generator == "wrk" and not wrk_available():
        raise RuntimeError("--generator wrk: wrk is not on PATH (apt-get install wrk)")
    return generator == "wrk" or (generator == "auto" and wrk_available())


def _post(url: str) -> None:
    request = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(request, timeout=5):  # loopback only
        pass
