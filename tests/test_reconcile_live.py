"""Reconcile on a live campaign: 52,000 reservations read in chunks while buyers keep
reserving, settling and giving back, and no Redis command of the reconcile as long as
10 ms (SLOWLOG, measured by Redis). Its verdict is the one-pass audit's
(tests/audit_at_once.lua, what reconcile ran before) on the same quiet data; a drift
made by hand is found live with the rows that audit finds, a repair is refused while a
record is missing and, once it is back, fixes counters and quotas while buyers buy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from redis.asyncio import Redis

from gateway.embedded.server import EmbeddedRedis
from limiter.audit import Audit, audit, verdict
from limiter.books import EFFECTS, RESETS, Books, BooksChanged
from limiter.errors import StorageError
from limiter.keys import new_reservation_id
from limiter.records import Attempt, Figures, ReserveStatus, State
from limiter.scripts import lua_dir
from limiter.store import CampaignStore
from tests.helpers import auto_pipeline, check_invariant, ledger
from tests.scripts_rig import ACTOR, CAMPAIGN, Rig, reserved

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")

RESERVATIONS = 52_000
#: Two reservations each; the limit leaves room for one more.
USERS = 26_000
LIMIT = 3
STOCK = 1_000_000
#: Users the buyers never touch, for drift made by hand.
QUIET_USERS = 2_000
#: SLOWLOG's threshold in these tests, µs: no reconcile command may take this long.
SLOW_US = 10_000
#: Runs in which to see no reconcile command that long (see in_a_clean_window).
WINDOWS = 3
#: The fields reconcile reads of a record.
RECORD_FIELDS = ["state", "user", "qty"]


def user(i: int) -> str:
    return f"u{i}"


@dataclass
class Campaign:
    store: CampaignStore
    #: every reservation, the i-th that of user i % USERS
    rids: list[str]
    #: what the buyers may settle: reservations still reserved and holds, of their users
    reserved: list[str]
    held: list[str]


async def settle_all(store: CampaignStore, rids: Sequence[str], how: str) -> None:
    """Settle in round trips of 500: commit, hold or release each of ``rids``."""
    for start in range(0, len(rids), 500):
        chunk = rids[start : start + 500]
        await asyncio.gather(*(settle(store, rid, how) for rid in chunk))


async def settle(store: CampaignStore, rid: str, how: str) -> None:
    if how == "commit":
        await store.commit(rid, target=State.COMMITTED)
    elif how == "hold":
        await store.commit(rid, target=State.HELD, hold_ms=600_000)
    elif how == "confirm":
        await store.commit(rid, target=State.COMMITTED, leavable=State.HELD)
    elif how == "retake":
        await store.commit(rid, target=State.COMMITTED, retake=True)
    elif how == "cancel":
        await store.release(
            rid, leavable=[State.COMMITTED], target=State.CANCELLED, reason="return", actor=ACTOR
        )
    else:
        await store.release(
            rid,
            leavable=[State.RESERVED, State.HELD],
            target=State.RELEASED,
            reason="refused",
            actor=ACTOR,
        )


async def big_campaign(rig: Rig) -> Campaign:
    """52,000 reservations of 26,000 users through reserve.lua, 1,000 per call; then a
    fifth committed, a tenth held, a tenth released, the rest left reserved."""
    store = rig.store(per_user_limit=LIMIT)
    await store.init(STOCK)
    rids: list[str] = []
    for start in range(0, RESERVATIONS, 1000):
        batch = [
            Attempt(new_reservation_id(CAMPAIGN), user(i % USERS), 1)
            for i in range(start, start + 1000)
        ]
        decisions = await store.reserve(batch)
        assert {d.status for d in decisions} == {ReserveStatus.RESERVED}
        rids += [a.reservation_id for a in batch]
    await settle_all(store, rids[0::10] + rids[1::10], "commit")
    await settle_all(store, rids[2::10], "hold")
    await settle_all(store, rids[3::10], "release")

    def buyers_own(shares: range) -> list[str]:
        return [r for i, r in enumerate(rids) if i % 10 in shares and i % USERS >= QUIET_USERS]

    return Campaign(store, rids, reserved=buyers_own(range(4, 10)), held=buyers_own(range(2, 3)))


@dataclass
class Buyers:
    """What the buyers did: decisions of reserve.lua, settlements."""

    decisions: int = 0
    settled: int = 0
    #: set once the first attempts are decided
    started: asyncio.Event = field(default_factory=asyncio.Event)


async def buy(campaign: Campaign, done: Buyers, stop: asyncio.Event) -> None:
    """Reserve eight at a time, commit half the winners, hold a quarter, give a quarter
    back (and take one of those again, late), settle old reservations and holds, now and
    then cancel a sale and add stock: every op the ledger knows but init and repair."""
    store, rng = campaign.store, random.Random(5)
    sold: list[str] = []
    while not stop.is_set():
        batch = [Attempt(new_reservation_id(CAMPAIGN), pick_buyer(rng), 1) for _ in range(8)]
        decisions = await store.reserve(batch)
        done.decisions += len(decisions)
        done.started.set()
        won = [d.reservation_id for d in decisions if d.status is ReserveStatus.RESERVED]
        steps = [settle(store, rid, "commit") for rid in won[::2]]
        steps += [settle(store, rid, "release") for rid in won[1::4]]
        steps += [settle(store, rid, "hold") for rid in won[3::4]]
        if campaign.reserved:
            steps.append(settle(store, campaign.reserved.pop(), rng.choice(["commit", "release"])))
        if campaign.held:
            steps.append(settle(store, campaign.held.pop(), rng.choice(["confirm", "release"])))
        await asyncio.gather(*steps)
        for rid in won[1::4][:1]:
            await settle(store, rid, "retake")  # a late acceptance takes it again
        sold += won[::2]
        if sold and rng.random() < 0.2:
            await settle(store, sold.pop(0), "cancel")
        if rng.random() < 0.05:
            await store.adjust(delta=1, actor=ACTOR)
        done.settled += len(steps)


def pick_buyer(rng: random.Random) -> str:
    """Half the time one of the campaign's users (who hold two already), else a newcomer."""
    if rng.random() < 0.5:
        return user(rng.randrange(QUIET_USERS, USERS))
    return f"new{rng.randrange(20_000)}"


@contextlib.asynccontextmanager
async def buying(campaign: Campaign) -> AsyncIterator[Buyers]:
    """Buyers at work for the whole block (and already when it starts)."""
    done, stop = Buyers(), asyncio.Event()
    task = asyncio.create_task(buy(campaign, done, stop))
    try:
        async with asyncio.timeout(10):
            await done.started.wait()
        yield done
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def reconciling(
    redis_server: EmbeddedRedis, store: CampaignStore
) -> AsyncIterator[CampaignStore]:
    """The campaign's store on a pipeline of its own, as ``flashgate reconcile`` has it."""
    async with auto_pipeline(redis_server.url, 30.0) as pipe:
        yield CampaignStore(pipe, store.scripts, store.keys, store.policy)


@contextlib.asynccontextmanager
async def slowlog(redis: Redis) -> AsyncIterator[None]:
    """SLOWLOG keeps every command of SLOW_US or longer from here on."""
    before = await redis.config_get("slowlog-log-slower-than")
    await redis.config_set("slowlog-log-slower-than", SLOW_US)
    await redis.slowlog_reset()
    try:
        yield
    finally:
        await redis.config_set("slowlog-log-slower-than", str(before["slowlog-log-slower-than"]))


async def slow_commands_of_reconcile(redis: Redis, store: CampaignStore) -> list[Any]:
    """SLOWLOG's entries for commands a reconcile sends: its scripts, ZRANGE of the index,
    HSCAN of the users hash and HMGETs of three fields of a record or of quotas. (Redis 7
    logs the commands scripts run too: the buyers' scripts read records otherwise.)"""
    s, k = store.scripts, store.keys
    shas = {x.sha for x in (s.follow_ledger, s.audit_close, s.repair_counters, s.repair_quotas)}

    def of_reconcile(command: list[str]) -> bool:
        name, key, rest = command[0].upper(), command[1], command[2:]
        return (
            (name == "EVALSHA" and key in shas)
            or (name == "ZRANGE" and key == k.index)
            or (name in ("HSCAN", "HMGET") and key == k.users)
            or (name == "HMGET" and key.startswith(k.reservation("")) and rest == RECORD_FIELDS)
        )

    entries = await redis.slowlog_get(1024)
    return [e for e in entries if of_reconcile(e["command"].decode(errors="replace").split())]


async def in_a_clean_window(
    redis: Redis, store: CampaignStore, reconcile: Callable[[], Awaitable[T]]
) -> T:
    """What ``reconcile`` returns from a run in which no command of the reconcile took
    SLOW_US or longer by Redis's clock. That clock also counts the time Redis was off the
    CPU: on a shared 2-core machine a stall of 10 ms now and then lands in any command (a
    buyer's one-member ZADD as well), so a run may be tried WINDOWS times; a command that
    is long by what it does is long in every run."""
    slow: list[Any] = []
    for _ in range(WINDOWS):
        async with slowlog(redis):
            done = await reconcile()
            slow = await slow_commands_of_reconcile(redis, store)
        if not slow:
            return done
    raise AssertionError(f"commands of the reconcile took {SLOW_US} µs or longer: {slow}")


def _figures(text: bytes) -> Figures:
    return Figures(*(int(part) for part in text.decode().split("/")))


async def at_once(redis: Redis, store: CampaignStore) -> Audit:
    """The one-pass audit, as reconcile ran it before: one script over every record."""
    k = store.keys
    rids = cast(list[bytes], await redis.zrange(k.index, 0, -1))
    keys = [k.state, k.users, k.index, k.ledger, *(k.reservation(r.decode()) for r in rids)]
    text = (lua_dir() / "_prelude.lua").read_text() + "\n"
    text += (Path(__file__).parent / "audit_at_once.lua").read_text()
    args: list[str | int] = ["", ACTOR, store.policy.ledger_max_length, k.events]
    reply = await redis.eval(text, len(keys), *keys, *args)
    assert int(reply[0]) == 0, reply
    return Audit(
        campaign_id=store.campaign_id,
        counters=_figures(reply[1]),
        reserved_by_records=int(reply[2]),
        sold_by_records=int(reply[3]),
        users_differing=int(reply[4]),
        user_drift=sorted((u.decode(), int(a), int(b)) for u, a, b in reply[5]),
        ledger_after=_figures(reply[6]) if reply[6] else None,
        count_drift=sorted((s.decode(), int(a), int(b)) for s, a, b in reply[8]),
        missing_records=int(reply[9]),
    )


def comparable(found: Audit) -> Audit:
    """The lists in one order (the one-pass audit's follows Lua's tables)."""
    return replace(
        found, user_drift=sorted(found.user_drift), count_drift=sorted(found.count_drift)
    )


def drifting(found: Audit) -> dict[str, int]:
    """Each check that fails, and by how much; but the checks against the ledger's last
    entry: on a live campaign the next purchase writes the drifted counters there."""
    return {
        what: counter - expected
        for what, counter, expected in found.checks()
        if counter != expected and "the ledger's last entry" not in what
    }


async def test_a_live_reconcile_of_52000_reservations_never_holds_redis_and_agrees(
    rig: Rig, redis: Redis, redis_server: EmbeddedRedis
) -> None:
    campaign = await big_campaign(rig)
    async with reconciling(redis_server, campaign.store) as store:
        built = await store.figures()
        assert built.reserved + built.sold == 52_000 - 52_000 // 10

        live, decided_during = await in_a_clean_window(
            redis, store, lambda: while_buying(campaign, audit(store, repair=False, actor=ACTOR))
        )
        assert decided_during > 0
        assert not live.drift, live.checks()
        assert live.counters != built  # the verdict is about an instant of the sale

        # quiet again: the one-pass audit says what the live one says
        after = await audit(store, repair=False, actor=ACTOR)
        assert comparable(after) == await at_once(redis, store)
        assert not after.drift, after.checks()
        await check_invariant(redis, CAMPAIGN, per_user_limit=LIMIT)


QUOTAS_WRONG = range(10, 1210)


async def _books_wrong(redis: Redis, campaign: Campaign) -> None:
    """Quiet users' quotas wrong: 1,200 at the limit (three repair steps), one missing,
    one for nobody; two phantom reserved units, a committed reservation too many in the
    count."""
    k = campaign.store.keys
    await redis.hincrby(k.state, "reserved", 2)
    await redis.hincrby(k.state, "n:committed", 1)
    await redis.hset(k.users, mapping={user(i): 3 for i in QUOTAS_WRONG})
    await redis.hdel(k.users, user(6))
    await redis.hset(k.users, "nobody", 1)


async def _record_lost(redis: Redis, campaign: Campaign) -> dict[Any, Any]:
    """u4's reserved reservation loses its record; returns what it held."""
    key = campaign.store.keys.reservation(campaign.rids[4])
    lost = await redis.hgetall(key)
    await redis.delete(key)
    return cast(dict[Any, Any], lost)


async def while_buying(campaign: Campaign, reconcile: Awaitable[T]) -> tuple[T, int]:
    """What ``reconcile`` returns, run while buyers buy, and the attempts they had
    decided meanwhile."""
    async with buying(campaign) as buyers:
        before = buyers.decisions
        done = await reconcile
        return done, buyers.decisions - before


def same_verdict(live: Audit, reference: Audit) -> None:
    """Every field alike; of more than 100 differing users, each lists 100 (its own
    choice of them), alike where they list the same user."""
    live = comparable(live)
    assert replace(live, user_drift=[]) == replace(reference, user_drift=[])
    same_rows(live, reference)


def same_rows(live: Audit, reference: Audit) -> None:
    if reference.users_differing <= 100:
        assert sorted(live.user_drift) == sorted(reference.user_drift)
        return
    assert len(live.user_drift) == len(reference.user_drift) == 100
    theirs = {row[0]: row for row in reference.user_drift}
    assert all(theirs.get(row[0], row) == row for row in live.user_drift)


async def test_a_drift_made_by_hand_is_found_live_as_the_one_pass_found_it_and_repaired(
    rig: Rig, redis: Redis, redis_server: EmbeddedRedis
) -> None:
    campaign = await big_campaign(rig)
    async with reconciling(redis_server, campaign.store) as store:
        await _books_wrong(redis, campaign)
        lost = await _record_lost(redis, campaign)
        reference = await at_once(redis, store)
        same_verdict(await audit(store, repair=False, actor=ACTOR), reference)
        assert reference.missing_records == 1
        assert reference.users_differing == len(QUOTAS_WRONG) + 3  # u4 (its lost record), u6
        assert drifting(reference) == {
            "stock_total = available + reserved + sold": -2,
            "reserved vs reservation records": 3,  # two phantom units and the lost one
            "users whose quota differs from their records": len(QUOTAS_WRONG) + 3,
            "reservations in the index without a record": 1,
            "committed reservations vs records": 1,
            "reserved reservations vs records": 1,  # the lost record was reserved
        }

        async with buying(campaign):
            live = await audit(store, repair=False, actor=ACTOR)
            refused = await audit(store, repair=True, actor=ACTOR)
        for found in (live, refused):
            assert drifting(found) == drifting(reference)
            same_rows(found, reference)
        assert refused.repair_refused
        assert refused.repaired is None
        assert "repair" not in {entry["op"] for entry in await ledger(redis, CAMPAIGN)}

        await redis.hset(store.keys.reservation(campaign.rids[4]), mapping=lost)  # restored
        tries = 0

        async def repair() -> tuple[Audit, int]:
            nonlocal tries
            if tries:
                await _books_wrong(redis, campaign)  # the books of the last try were repaired
            tries += 1
            return await while_buying(campaign, audit(store, repair=True, actor=ACTOR))

        repaired, decided_during = await in_a_clean_window(redis, store, repair)
        assert decided_during > 0
        assert repaired.repaired is not None
        assert not repaired.repair_refused
        assert drifting(repaired) == {  # what it repaired: the drift but the lost record
            "stock_total = available + reserved + sold": -2,
            "reserved vs reservation records": 2,
            "users whose quota differs from their records": len(QUOTAS_WRONG) + 2,
            "committed reservations vs records": 1,
        }

        after = await audit(store, repair=False, actor=ACTOR)
        assert not after.drift, after.checks()
        assert comparable(after) == await at_once(redis, store)


async def test_changes_between_the_chunks_and_the_close_are_accounted_for(
    rig: Rig, redis: Redis
) -> None:
    """Step by step, so that each kind of change surely lands between reading and
    closing: the verdict is the one-pass audit's at the close."""
    store = rig.store(per_user_limit=LIMIT)
    await store.init(100)
    first = [await reserved(store, user(i)) for i in range(6)]
    await store.commit(first[0], target=State.COMMITTED)
    await store.commit(first[1], target=State.HELD, hold_ms=600_000)
    await store.release(
        first[2], leavable=[State.RESERVED], target=State.RELEASED, reason="x", actor=ACTOR
    )
    books = await Books.starting(store)
    await store.commit(first[3], target=State.COMMITTED)  # before the chunks are read
    await redis.hset(store.keys.users, user(3), 9)  # by hand
    await books.scan()
    await settle(store, first[0], "cancel")  # after: each op once
    await settle(store, first[1], "confirm")
    await settle(store, first[2], "retake")
    await settle(store, first[4], "release")
    await settle(store, first[5], "hold")
    newer = await reserved(store, user(0))
    await reserved(store, "newcomer", 2)
    await store.commit(newer, target=State.COMMITTED)
    await store.adjust(delta=5, actor=ACTOR)
    await books.close()
    found = verdict(books).audit
    assert comparable(found) == await at_once(redis, store)
    assert found.user_drift == [(user(3), 9, 1)]


async def test_a_ledger_trimmed_past_the_position_is_read_again(rig: Rig, redis: Redis) -> None:
    store = rig.store()
    await store.init(100)
    books = await Books.starting(store)
    for _ in range(3):
        await store.adjust(delta=1, actor=ACTOR)
    await redis.xtrim(store.keys.ledger, maxlen=1, approximate=False)  # two entries lost
    with pytest.raises(BooksChanged):
        await books.follow()
    with pytest.raises(BooksChanged):
        await books.close()
    # a whole reconcile starts again from where the ledger stands, and succeeds
    found = await audit(store, repair=False, actor=ACTOR)
    assert tuple(found.counters) == (103, 0, 0, 103)
    assert not found.drift, found.checks()


async def test_a_reconcile_gives_up_when_the_books_are_rewritten_every_time(
    rig: Rig, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An init (or another reconcile's repair) between reading and closing: what was
    read no longer holds; after a few tries the reconcile says so."""
    store = rig.store()
    await store.init(100)
    await reserved(store, "alice")
    close = Books.close

    async def rewritten_meanwhile(books: Books) -> None:
        await redis.xadd(store.keys.ledger, {"op": "init", "rid": "", "user": "", "qty": 0})
        await close(books)

    monkeypatch.setattr(Books, "close", rewritten_meanwhile)
    with pytest.raises(StorageError, match="kept changing"):
        await audit(store, repair=False, actor=ACTOR)


def test_reconcile_knows_what_every_op_in_the_scripts_does() -> None:
    """Each op a script writes to the ledger by name is one whose effect on a record and
    a quota reconcile knows (the ops named by a variable: commit.lua's and release.lua's
    targets, are in EFFECTS by hand)."""
    named = {
        op
        for path in lua_dir().glob("*.lua")
        for op in re.findall(
            r"append_ledger\(\s*ledger_key,\s*ledger_max,\s*'([a-z-]+)'", path.read_text()
        )
    }
    assert {"reserve", "adjust", "init", "commit-conflict", "hand-over", "redeliver"} <= named
    assert named <= EFFECTS.keys() | RESETS
