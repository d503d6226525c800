"""Reconciling a campaign: its counters against its reservation records, its users'
quotas and its ledger (see lua/audit.lua for which side wins a repair)."""

from __future__ import annotations

from dataclasses import dataclass, field

from limiter.errors import CampaignMissing, StorageError
from limiter.records import Figures
from limiter.store import CampaignStore

#: The index may change between reading it and auditing; this many tries, then give up.
ATTEMPTS = 5


@dataclass(frozen=True)
class Audit:
    campaign_id: str
    counters: Figures
    reserved_by_records: int
    sold_by_records: int
    users_differing: int
    #: (user, units in the quota hash, units by the records), at most 100
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


def _figures(text: bytes) -> Figures:
    return Figures(*(int(part) for part in text.decode().split("/")))


async def audit(store: CampaignStore, *, repair: bool, actor: str) -> Audit:
    k = store.keys
    for _ in range(ATTEMPTS):
        rids = await store.pipe.call("ZRANGE", k.index, 0, -1, what="read the index")
        keys = [k.state, k.users, k.index, k.ledger, *(k.reservation(r.decode()) for r in rids)]
        args = ["repair" if repair else "", actor, store.policy.ledger_max_length, k.events]
        reply = await store.pipe.script(store.scripts.audit, keys, args, "audit")
        status = int(reply[0])
        if status == 2:
            raise CampaignMissing(store.campaign_id)
        if status == 0:
            repaired = bool(int(reply[10]))
            return Audit(
                campaign_id=store.campaign_id,
                counters=_figures(reply[1]),
                reserved_by_records=int(reply[2]),
                sold_by_records=int(reply[3]),
                users_differing=int(reply[4]),
                user_drift=[(u.decode(), int(a), int(b)) for u, a, b in reply[5]],
                ledger_after=_figures(reply[6]) if reply[6] else None,
                repaired=_figures(reply[7]) if repaired else None,
                count_drift=[(s.decode(), int(a), int(b)) for s, a, b in reply[8]],
                missing_records=int(reply[9]),
                repair_refused=repair and not repaired,
            )
    raise StorageError(f"campaign {store.campaign_id} kept changing; audit it when it is quieter")
