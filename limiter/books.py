"""A campaign's books (reservation records, users' quotas, counters) as of one instant,
read while the campaign sells, without ever holding Redis for long.

One script over every record (what reconcile used to run) is one Redis command as
long as the campaign is big: 557 ms for 89,000 reservations, during which every
purchase waits and fails closed. Here the records and the quotas are read in chunks
of a few hundred (ZRANGE, HSCAN and one HMGET per record, each round trip a few
milliseconds of Redis at most), the ledger is followed all along, and one short
atomic step (lua/audit_close.lua) takes the counters and what the chunks could not
know, at the instant the verdict is about.

Why that is exact: every change to a record's state or a user's quota is a script
that appends a ledger entry naming the reservation, its user and its quantity, in the
same atomic step. So a record that no entry after the starting position names is as
it was read; one that an entry names is in the state its latest entry left it in
(``EFFECTS``: reserve leaves it reserved, commit committed, ...), whenever it was read.
A quota moves by increments, so a user an entry names is read again after the entry
was seen, or in the closing step. The index only grows (reserve.lua, with the entry of
the reservation), so its members are those read and those reserve entries name: the
closing step counts them to make sure. HSCAN returns every user that was there from
its first call to its last; one added or removed meanwhile has an entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from limiter.errors import CampaignMissing, StorageError
from limiter.records import Figures, State
from limiter.store import CampaignStore

#: Reservation ids per ZRANGE (so HMGETs per round trip) and users per HSCAN: each
#: command a fraction of a millisecond of Redis (a few hundred µs on a slow machine).
CHUNK = 400
USERS_CHUNK = 200
#: Ledger entries per follow_ledger call.
LEDGER_STEP = 1000
#: The closing step (and each repair step) takes at most this many entries since the
#: position, and the quotas of at most this many users the reconcile still asks about.
STEP_ENTRIES = 500
STEP_USERS = 500
#: Quotas read again per round trip while catching up.
REFRESH_USERS = 1000
#: Closing steps refused because the ledger ran ahead, before giving up.
CLOSE_TRIES = 50
#: The per-state counts the records are checked against (others when records have them).
STATES: tuple[str, ...] = tuple(state.value for state in State)


class BooksChanged(Exception):
    """What was read cannot be completed: the ledger lost entries after the position
    (trimmed faster than it was followed), or a repair or an init rewrote the books
    meanwhile. Read them again from the start."""


class Position(NamedTuple):
    """A place in the ledger: an entry's id ("0-0" before the first) and how many
    entries had been added up to it (what lets a script tell that none after it is gone)."""

    id: str
    seq: int


class Entry(NamedTuple):
    """A ledger entry, as much of it as tells what it moved."""

    id: str
    op: str
    rid: str
    user: str
    qty: int


class Record(NamedTuple):
    state: str
    user: str
    qty: int


class Effect(NamedTuple):
    """What an op does: the state it leaves its reservation in (None: unchanged), and
    whether it moves the user's quota."""

    state: str | None
    quota: bool


#: Every op the scripts write to the ledger, but init and repair (``RESETS``). A new op
#: belongs here too: reconcile refuses a ledger with one it does not know.
EFFECTS: dict[str, Effect] = {
    "reserve": Effect(State.RESERVED, True),
    "commit": Effect(State.COMMITTED, False),
    "confirm": Effect(State.COMMITTED, False),
    "hold": Effect(State.HELD, False),
    "late-commit": Effect(State.COMMITTED, True),
    "late-hold": Effect(State.HELD, True),
    "released": Effect(State.RELEASED, True),
    "expired": Effect(State.EXPIRED, True),
    "cancelled": Effect(State.CANCELLED, True),
    "replay": Effect(State.RESERVED, True),  # a dead letter taken again (released before)
    "commit-conflict": Effect(None, False),
    "redeliver": Effect(None, False),
    "hand-over": Effect(None, False),
    "adjust": Effect(None, False),
    "transfer-out": Effect(None, False),  # stock sent to another shard (shards: K)
    "transfer-in": Effect(None, False),  # stock taken in from another shard
}
#: Ops that rewrite quotas and counts without naming them: what was read is out of date.
RESETS = frozenset({"init", "repair"})


class Tally(NamedTuple):
    """What the records say."""

    reserved: int
    sold: int
    #: reservations by state: the six states, then any other a record has
    states: dict[str, int]
    #: units each user holds (reserved, held or sold) by the records
    held_by: dict[str, int]
    #: indexed reservations without a record
    missing: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def entries_of(flat: Sequence[Any]) -> list[Entry]:
    """Entries from a script's flat list: id, op, rid, user, qty of each."""
    texts = [_text(item) for item in flat]
    return [
        Entry(texts[i], texts[i + 1], texts[i + 2], texts[i + 3], int(texts[i + 4] or 0))
        for i in range(0, len(texts), 5)
    ]


def figures_of(text: str) -> Figures:
    return Figures(*(int(part) for part in text.split("/")))


def _record(reply: Sequence[Any]) -> Record | None:
    state, user, qty = reply
    if state is None:
        return None
    return Record(_text(state), _text(user) if user else "", int(qty) if qty else 0)


def chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    return (items[i : i + size] for i in range(0, len(items), size))


@dataclass
class Books:
    """What is known of one campaign's books, and the ledger position up to which it
    accounts for every change. Exact at each ``close()``; between closes, records and
    quotas are as read, corrected by the entries taken since."""

    store: CampaignStore
    position: Position
    #: records as read, by reservation id (None: indexed, no record)
    records: dict[str, Record | None] = field(default_factory=dict)
    #: records as the latest entry after the starting position left them
    moved: dict[str, Record] = field(default_factory=dict)
    #: the users hash as known (a user absent holds nothing)
    quotas: dict[str, int] = field(default_factory=dict)
    #: users whose quota was read before a change the ledger shows
    stale: set[str] = field(default_factory=set)
    #: users whose reservations moved since the last close (their records' units changed)
    touched: set[str] = field(default_factory=set)
    #: the state hash at the last close
    state: dict[str, str] = field(default_factory=dict)
    #: the ledger's last "after" figures at the last close (None: no ledger)
    ledger_after: Figures | None = None
    #: the last follow_ledger call left entries unread
    behind: bool = False

    @classmethod
    async def read(cls, store: CampaignStore) -> Books:
        """The books at one instant: scanned in chunks, closed by one atomic step."""
        books = await cls.starting(store)
        await books.scan()
        await books.close()
        return books

    @classmethod
    async def starting(cls, store: CampaignStore) -> Books:
        """Books that know nothing yet, at the position where the ledger ends now:
        whatever changes from here on, an entry after it says so."""
        reply = await store.pipe.script(
            store.scripts.follow_ledger, [store.keys.ledger], ["", 0, 0], "find the ledger's end"
        )
        return cls(store, Position(_text(reply[2]), max(int(reply[1]), 0)))

    # --- reading in chunks

    async def scan(self) -> None:
        """Every indexed record and every quota, a chunk per round trip, each round trip
        following the ledger too (so that it is never trimmed past the position)."""
        index: int | None = 0
        users: str | None = "0"
        pending: list[str] = []
        while index is not None or users is not None or pending:
            index, users, pending = await self._scan_step(index, users, pending)

    async def _scan_step(
        self, index: int | None, users: str | None, pending: list[str]
    ) -> tuple[int | None, str | None, list[str]]:
        """One round trip: the records of ``pending``, the next chunk of the index by rank
        (their records read on the next step), the next of the users hash (HSCAN), and
        the ledger. Returns where to go on (None: done) and the ids to read next.

        The index grows at its end (scored by creation time): what is inserted before
        the rank reached only shifts members already read further on, read twice then.
        ZRANGE by rank costs far less than ZSCAN, which formats every score."""
        k, pipe = self.store.keys, self.store.pipe
        futures = [self._submit_follow()]
        futures += [pipe.submit("HMGET", k.reservation(r), "state", "user", "qty") for r in pending]
        if index is not None:
            futures.append(pipe.submit("ZRANGE", k.index, index, index + CHUNK - 1))
        if users is not None:
            futures.append(pipe.submit("HSCAN", k.users, users, "COUNT", USERS_CHUNK))
        replies = await self._together(futures, "read the records")
        rest = replies[1 + len(pending) :]
        for rid, record in zip(pending, replies[1 : 1 + len(pending)], strict=True):
            self.records[rid] = _record(record)
        ids: list[str] = []
        if index is not None:
            members = [_text(member) for member in rest.pop(0)]
            ids = [r for r in members if r not in self.records]
            index = index + len(members) if len(members) == CHUNK else None
        if users is not None:
            cursor, pairs = rest.pop(0)
            users = None if _text(cursor) == "0" else _text(cursor)
            self._quotas_read(pairs[::2], pairs[1::2])
        self.take(self._followed(replies[0]))
        return index, users, ids

    async def follow(self, refresh: Sequence[str] = ()) -> None:
        """One round trip: the ledger since the position, and the quotas of ``refresh``."""
        futures = [self._submit_follow()]
        if refresh:
            futures.append(self.store.pipe.submit("HMGET", self.store.keys.users, *refresh))
        replies = await self._together(futures, "follow the ledger")
        if refresh:
            self._quotas_read(refresh, replies[1])
        self.take(self._followed(replies[0]))

    async def close(self) -> None:
        """Catch up with the ledger, then take the instant of the verdict atomically."""
        for _ in range(CLOSE_TRIES):
            while self.behind or len(self.stale) > STEP_USERS:
                await self.follow(list(self.stale)[:REFRESH_USERS])
            if await self._close_once():
                return
            await self.follow(list(self.stale)[:REFRESH_USERS])
        raise BooksChanged("the ledger kept running ahead of the closing step")

    async def _close_once(self) -> bool:
        s, k, at = self.store, self.store.keys, self.position
        asked = list(self.stale)
        reply = await s.pipe.script(
            s.scripts.audit_close,
            [k.state, k.users, k.ledger, k.index],
            [at.id, at.seq, STEP_ENTRIES, *asked],
            "close the audit",
        )
        status = int(reply[0])
        if status == 2:
            raise CampaignMissing(s.campaign_id)
        if status == 3:
            raise BooksChanged("the ledger lost entries after the position")
        if status == 1:
            return False
        flat_state, added, after, entries, quotas, indexed = reply[1:]
        self.take(entries_of(entries))
        self.check_count(int(added))
        if len(self.records.keys() | self.moved.keys()) != int(indexed):
            raise BooksChanged("the index changed in a way no ledger entry tells")
        self._quotas_read(quotas[::2], quotas[1::2])
        self.state = {
            _text(name): _text(v) for name, v in zip(flat_state[::2], flat_state[1::2], strict=True)
        }
        self.ledger_after = figures_of(_text(after)) if after else None
        self.touched.clear()
        return True

    def _submit_follow(self) -> asyncio.Future[Any]:
        s, at = self.store, self.position
        return s.pipe.submit_script(
            s.scripts.follow_ledger, [s.keys.ledger], [at.id, at.seq, LEDGER_STEP]
        )

    async def _together(self, futures: list[asyncio.Future[Any]], what: str) -> list[Any]:
        """The replies of commands queued in one tick: one round trip of the auto-pipeline."""
        return await self.store.pipe.guard.wait(asyncio.gather(*futures), what)

    def _followed(self, reply: Sequence[Any]) -> list[Entry]:
        if not int(reply[0]):
            raise BooksChanged("the ledger lost entries after the position")
        entries = entries_of(reply[3:])
        self.behind = len(entries) >= LEDGER_STEP
        return entries

    def _quotas_read(self, users: Sequence[Any], units: Sequence[Any]) -> None:
        """Quotas read after every entry taken so far: current until a later entry."""
        for user, value in zip(users, units, strict=True):
            name = _text(user)
            self.stale.discard(name)
            if value is None:
                self.quotas.pop(name, None)
            else:
                self.quotas[name] = int(value)

    # --- what the ledger says

    def take(self, entries: Sequence[Entry]) -> None:
        """Entries after the position, in order: what they did to records and quotas.
        The position moves past them."""
        for entry in entries:
            if entry.op in RESETS:
                raise BooksChanged(f"a {entry.op} at {entry.id} rewrote the books")
            effect = EFFECTS.get(entry.op)
            if effect is None:
                raise StorageError(
                    f"ledger entry {entry.id} of {self.store.campaign_id}: op {entry.op!r} "
                    "is not one this reconcile knows (is it older than the gateways?)"
                )
            if effect.state is not None:
                self.moved[entry.rid] = Record(effect.state, entry.user, entry.qty)
            if effect.quota and entry.user:
                self.stale.add(entry.user)
                self.touched.add(entry.user)
        if entries:
            self.position = Position(entries[-1].id, self.position.seq + len(entries))

    def check_count(self, added: int) -> None:
        """Every entry added up to the position was taken (-1: Redis before 7.0 does not
        count them)."""
        if added >= 0 and self.position.seq != added:
            raise BooksChanged("the ledger's count of entries does not match what was read")

    def passed(self, own_entry: str) -> None:
        """The position moves past an entry of this reconcile's own (a repair step)."""
        self.position = Position(own_entry, self.position.seq + 1)

    # --- what the books say

    def counters(self) -> Figures:
        return Figures(*(int(self.state.get(name, 0)) for name in Figures._fields))

    def counted(self, state: str) -> int:
        """Reservations in ``state`` by the count kept beside the counters."""
        return int(self.state.get(f"n:{state}", 0))

    def tally(self) -> Tally:
        reserved = sold = missing = 0
        states = dict.fromkeys(STATES, 0)
        held_by: dict[str, int] = {}
        for rid in self.records.keys() | self.moved.keys():
            record = self.moved.get(rid) or self.records.get(rid)
            if record is None:
                missing += 1
                continue
            states[record.state] = states.get(record.state, 0) + 1
            if record.state in (State.RESERVED, State.HELD):
                reserved += record.qty
            elif record.state == State.COMMITTED:
                sold += record.qty
            if record.state in (State.RESERVED, State.HELD, State.COMMITTED):
                held_by[record.user] = held_by.get(record.user, 0) + record.qty
        return Tally(reserved, sold, states, held_by, missing)
