"""The rig of the Lua script tests (tests/test_*_script.py and their neighbours): one
client, its scripts and one auto-pipeline, as gateway/runtime.py builds them, and helpers
that reserve, release and read what the scripts left in Redis. The ``rig`` fixture is in
tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from limiter.batching import TickBatcher
from limiter.keys import CampaignKeys, idempotency_field, new_reservation_id
from limiter.pipeline import AutoPipeline
from limiter.records import Attempt, Decision, ReserveStatus, State, Transition
from limiter.reserving import Unclaimed, release_unclaimed
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from tests.helpers import as_text, auto_pipeline, ledger, text, wait_for

CAMPAIGN = "c1"
ACTOR = "tester"
SENTINEL = b"-- sentinel --"
RECORD_FIELDS = {
    "user",
    "qty",
    "state",
    "mode",
    "idem",
    "created_ms",
    "updated_ms",
    "deadline_ms",
    "attempts",
}


class Rig:
    """What gateway/runtime.py builds: one client, its scripts, one auto-pipeline."""

    def __init__(self, client: Redis, scripts: Scripts, pipe: AutoPipeline) -> None:
        self.client = client
        self.scripts = scripts
        self.pipe = pipe

    def store(
        self,
        *,
        per_user_limit: int = 2,
        reserve_deadline_ms: int = 0,
        campaign: str = CAMPAIGN,
        mode: str = "sync",
    ) -> CampaignStore:
        policy = StorePolicy(
            per_user_limit=per_user_limit,
            reserve_deadline_ms=reserve_deadline_ms,
            ledger_max_length=1000,
            mode=mode,
        )
        return CampaignStore(self.pipe, self.scripts, CampaignKeys(campaign), policy)


@contextlib.asynccontextmanager
async def open_rig(url: str) -> AsyncIterator[Rig]:
    client = Redis.from_url(url)
    try:
        async with auto_pipeline(url, 1.0) as pipe:
            yield Rig(client, Scripts.read(), pipe)
    finally:
        await client.aclose()


def reserve_batcher(
    store: CampaignStore, unclaimed: Unclaimed | None = None
) -> TickBatcher[Attempt, Decision]:
    """The reserve batcher, wired as gateway/runtime.py wires it."""
    return TickBatcher(
        store.pipe.guard, store.submit_reserve, store.decisions, "reserve", unclaimed=unclaimed
    )


def releasing_winners(store: CampaignStore, seen: list[tuple[Attempt, Decision]]) -> Unclaimed:
    """The runtime's ``unclaimed`` handler, noting what it was handed."""

    release = release_unclaimed(store, ACTOR)

    def unclaimed(one: Attempt, decision: Decision) -> Awaitable[object] | None:
        seen.append((one, decision))
        return release(one, decision)

    return unclaimed


def attempt(user: str, quantity: int = 1, key: str = "") -> Attempt:
    field = idempotency_field(user, key) if key else ""
    return Attempt(new_reservation_id(CAMPAIGN), user, quantity, field)


async def decide(store: CampaignStore, one: Attempt) -> Decision:
    (decision,) = await store.reserve([one])
    return decision


async def reserved(store: CampaignStore, user: str, quantity: int = 1, key: str = "") -> str:
    """Reserve and insist that it worked; returns the reservation id."""
    one = attempt(user, quantity, key)
    decision = await decide(store, one)
    assert decision.status is ReserveStatus.RESERVED, decision
    return one.reservation_id


async def reserved_with_order(store: CampaignStore, user: str, order: bytes = b"order") -> str:
    """Reserve, keeping ``order`` on the record as the gateway does; the reservation id."""
    decision = await decide(store, attempt(user)._replace(payload=order))
    assert decision.status is ReserveStatus.RESERVED, decision
    return decision.reservation_id


async def alice_reserved(
    rig: Rig, mode: str, reserve_deadline_ms: int
) -> tuple[CampaignStore, str]:
    """A store with stock 10 in which alice holds a reservation with its order."""
    store = rig.store(mode=mode, reserve_deadline_ms=reserve_deadline_ms)
    await store.init(10)
    return store, await reserved_with_order(store, "alice")


async def until_due(store: CampaignStore, reservation_id: str) -> None:
    async def is_due() -> bool:
        return await store.due() == [reservation_id]

    await wait_for(is_due)


async def release(
    store: CampaignStore,
    reservation_id: str,
    *,
    leavable: Sequence[State] = (State.RESERVED,),
    target: State = State.RELEASED,
    only_when_due: bool = False,
) -> Transition:
    return await store.release(
        reservation_id,
        leavable=leavable,
        target=target,
        reason="backend refused",
        actor=ACTOR,
        only_when_due=only_when_due,
    )


async def record(redis: Redis, store: CampaignStore, reservation_id: str) -> dict[str, str]:
    return as_text(await redis.hgetall(store.keys.reservation(reservation_id)))


async def users(redis: Redis, store: CampaignStore) -> dict[str, int]:
    return {k: int(v) for k, v in as_text(await redis.hgetall(store.keys.users)).items()}


async def deadlines(redis: Redis, store: CampaignStore) -> dict[str, int]:
    entries = await redis.zrange(store.keys.deadlines, 0, -1, withscores=True)
    return {text(member): int(score) for member, score in cast(list[tuple[bytes, float]], entries)}


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    entry: dict[str, Any] = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0))


async def ops(redis: Redis) -> list[str]:
    return [entry["op"] for entry in await ledger(redis, CAMPAIGN)]


@contextlib.asynccontextmanager
async def listening(redis: Redis, channel: str) -> AsyncIterator[PubSub]:
    """A subscription that Redis has confirmed (so no later notice can be missed)."""
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(channel)
        async with asyncio.timeout(5):
            while await pubsub.get_message(timeout=1.0) is None:
                pass
        yield pubsub


async def notices(redis: Redis, pubsub: PubSub, channel: str) -> list[bytes]:
    """Every notice published so far: publishes a sentinel and reads up to it (in order)."""
    await redis.publish(channel, SENTINEL)
    seen: list[bytes] = []
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            if message["data"] == SENTINEL:
                return seen
            seen.append(message["data"])
