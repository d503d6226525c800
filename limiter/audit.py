"""Reconciling a campaign: its counters against its reservation records, its users'
quotas and its ledger, while it sells.

The books are read in chunks and closed at one instant (limiter/books.py), so no
Redis command of a reconcile is long, however many reservations there are. A repair
is short atomic steps too: the differing quotas a bounded chunk at a time, then the
counters and counts (see lua/repair_counters.lua for which side wins). Each step
takes the ledger position the previous one left, and says what ran in between, so
that nothing a purchase did meanwhile is undone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from limiter.books import STEP_ENTRIES, Books, BooksChanged, chunks, entries_of, figures_of
from limiter.errors import CampaignMissing, StorageError
from limiter.records import Figures
from limiter.store import CampaignStore

#: The books may be rewritten while they are read (a repair, an init), or the ledger
#: trimmed faster than it is followed; this many tries, then give up.
ATTEMPTS = 5
#: Quotas set per repair step.
QUOTA_CHUNK = 500
#: Rounds of repair steps and a fresh verdict: a user who buys during one is left for
#: the next.
REPAIR_ROUNDS = 4
#: A repair step refused because the ledger ran ahead, tried again after following it.
STEP_TRIES = 20
#: user_drift lists this many users at most.
LISTED_USERS = 100


@dataclass(frozen=True)
class Audit:
    campaign_id: str
    counters: Figures
    reserved_by_records: int
    sold_by_records: int
    users_differing: int
    #: (user, units in the quota hash, units by the records), at most 100, by user id
    user_drift: list[tuple[str, int, int]] = field(default_factory=list)
    #: The ledger's last "after" figures, None when the ledger is empty
    ledger_after: Figures | None = None
    #: The counters after a repair (None when none was asked)
    repaired: Figures | None = None
    #: (state, reservations counted in the state hash, by the records) where they differ
    count_drift: list[tuple[str, int, int]] = field(default_factory=list)
    #: Indexed reservations whose record is gone: the records are incomplete, so a
    #: repair is refused (it would put sold units back on sale).
    missing_records: int = 0
    #: A repair was asked for and refused (see missing_records).
    repair_refused: bool = False

    def checks(self) -> list[tuple[str, int, int]]:
        """(what, counter, expected) for every check; drift where the two differ."""
        c = self.counters
        rows = [
            (
                "stock_total = available + reserved + sold",
                c.stock_total,
                c.available + c.reserved + c.sold,
            ),
            ("reserved vs reservation records", c.reserved, self.reserved_by_records),
            ("sold vs reservation records", c.sold, self.sold_by_records),
            ("users whose quota differs from their records", self.users_differing, 0),
            ("reservations in the index without a record", self.missing_records, 0),
        ]
        rows += [
            (f"{state} reservations vs records", counted, records)
            for state, counted, records in self.count_drift
        ]
        if self.ledger_after is not None:
            for name, counter, ledger in zip(
                ("available", "reserved", "sold", "stock_total"), c, self.ledger_after, strict=True
            ):
                rows.append((f"{name} vs the ledger's last entry", counter, ledger))
        return rows

    @property
    def drift(self) -> bool:
        return any(counter != expected for _, counter, expected in self.checks())


@dataclass(frozen=True)
class Verdict:
    """An audit and what a repair would change, at the books' last close."""

    audit: Audit
    #: every user whose quota differs: units by the records
    targets: dict[str, int]

    @property
    def differences(self) -> Figures:
        """What to add to the counters to make them what a repair sets: reserved and
        sold by the records, stock_total by the ledger's last entry (at least what the
        records hold), available the rest."""
        a = self.audit
        c, reserved, sold = a.counters, a.reserved_by_records, a.sold_by_records
        stated = a.ledger_after.stock_total if a.ledger_after is not None else c.stock_total
        total = max(stated, reserved + sold)
        return Figures(
            total - reserved - sold - c.available,
            reserved - c.reserved,
            sold - c.sold,
            total - c.stock_total,
        )

    @property
    def counters_differ(self) -> bool:
        return any(self.differences) or bool(self.audit.count_drift)


def verdict(books: Books) -> Verdict:
    """What the books say at their last close, in the one-pass audit's terms (differing
    users listed by id, so that the same books always list the same hundred)."""
    tally = books.tally()
    quotas, held_by = books.quotas, tally.held_by
    differing = sorted(
        user
        for user in quotas.keys() | held_by.keys()
        if quotas.get(user, 0) != held_by.get(user, 0)
    )
    audit = Audit(
        campaign_id=books.store.campaign_id,
        counters=books.counters(),
        reserved_by_records=tally.reserved,
        sold_by_records=tally.sold,
        users_differing=len(differing),
        user_drift=[(u, quotas.get(u, 0), held_by.get(u, 0)) for u in differing[:LISTED_USERS]],
        ledger_after=books.ledger_after,
        count_drift=[
            (state, books.counted(state), n)
            for state, n in tally.states.items()
            if books.counted(state) != n
        ],
        missing_records=tally.missing,
    )
    return Verdict(audit, {user: held_by.get(user, 0) for user in differing})


async def audit(store: CampaignStore, *, repair: bool, actor: str) -> Audit:
    """The campaign's books at one instant; with ``repair``, made to agree (refused
    when indexed records are missing: the records would undercount what was sold)."""
    for _ in range(ATTEMPTS):
        try:
            books = await Books.read(store)
            found = verdict(books)
            if not repair:
                return found.audit
            if found.audit.missing_records:
                return replace(found.audit, repair_refused=True)
            return replace(found.audit, repaired=await _repair(books, found, actor))
        except BooksChanged:
            continue
    raise StorageError(f"campaign {store.campaign_id} kept changing; audit it when it is quieter")


async def _repair(books: Books, found: Verdict, actor: str) -> Figures:
    """Quotas, then counters (their entry the repair's last, as one atomic repair left
    it), then a fresh verdict; again for whatever moved under a step."""
    repaired: Figures | None = None
    for _ in range(REPAIR_ROUNDS):
        await _repair_quotas(books, found, actor)
        if repaired is None or found.counters_differ:
            repaired = await _repair_counters(books, found, actor)
        await books.close()
        found = verdict(books)
        if not found.audit.drift:
            return repaired
    raise StorageError(
        f"campaign {books.store.campaign_id} kept changing while it was repaired; "
        "what was repaired stays: reconcile it again"
    )


async def _repair_quotas(books: Books, found: Verdict, actor: str) -> None:
    """The differing users' quotas, a chunk per step. A user whose reservations moved
    since the verdict is left to the next round's verdict."""
    for chunk in chunks(sorted(found.targets), QUOTA_CHUNK):
        await _quota_step(books, [(user, found.targets[user]) for user in chunk], actor)


async def _quota_step(books: Books, targets: Sequence[tuple[str, int]], actor: str) -> None:
    s, k = books.store, books.store.keys
    for _ in range(STEP_TRIES):
        targets = [(user, units) for user, units in targets if user not in books.touched]
        if not targets:
            return
        at = books.position
        args: list[str | int] = [at.id, at.seq, STEP_ENTRIES, actor, s.policy.ledger_max_length]
        for user, units in targets:
            args += (user, units)
        reply = await s.pipe.script(
            s.scripts.repair_quotas, [k.state, k.users, k.ledger], args, "repair quotas"
        )
        if not await _stepped(books, reply):
            continue
        moved = {entry.user for entry in entries_of(reply[4])}
        for user, units in targets:
            if user not in moved:
                books.quotas[user] = units
                books.stale.discard(user)
        return
    raise BooksChanged("the ledger kept running ahead of the quota repair")


async def _repair_counters(books: Books, found: Verdict, actor: str) -> Figures:
    s, k = books.store, books.store.keys
    differences = "/".join(str(n) for n in found.differences)
    counts: list[str | int] = []
    for state, counted, records in found.audit.count_drift:
        counts += (state, records - counted)
    for _ in range(STEP_TRIES):
        at = books.position
        args: list[str | int] = [at.id, at.seq, STEP_ENTRIES, actor, s.policy.ledger_max_length]
        args += [k.events, differences, *counts]
        reply = await s.pipe.script(
            s.scripts.repair_counters, [k.state, k.ledger], args, "repair counters"
        )
        if await _stepped(books, reply):
            return figures_of(reply[1].decode())
    raise BooksChanged("the ledger kept running ahead of the counter repair")


async def _stepped(books: Books, reply: Sequence[Any]) -> bool:
    """Take a repair step's reply into the books: the entries that ran between the
    position and the step, then the step's own entry. False when the ledger ran too
    far ahead for one step: it has been followed now, try again."""
    status = int(reply[0])
    if status == 1:
        await books.follow()
        return False
    if status == 2:
        raise CampaignMissing(books.store.campaign_id)
    if status in (3, 4):
        raise BooksChanged("the ledger lost entries, or the books were rewritten meanwhile")
    books.take(entries_of(reply[4]))
    if reply[3]:
        books.passed(reply[3].decode())
    books.check_count(int(reply[2]))
    return True
