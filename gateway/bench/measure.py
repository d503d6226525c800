"""What one run measured, and the verdicts on the books after it.

Redis work is read from INFO commandstats before and after a run, summed over
every primary (``datastore.py``): commands a script ran count too, and a script
call is one EVALSHA (or EVAL). On the sold-out paths, where a request should cost
Redis nothing, the commands are also given net of the system's background work
(stock polls, heartbeats, deadline reads), measured over a quiet second with the
system up just before the run: what is left is what the requests cost. flashgate's
round trips are its own count (``flashgate_redis_seconds_count``: one per
auto-pipeline flush), read from its metrics before and after.

Two kinds of books are checked. A reservation design (flashgate, naive): the
counters balance, Redis sold what the buyers were told they won and the backend
received, nobody holds more than the limit, the backend saw exactly the winners
and none twice. The deduct-only design keeps one counter: it was never below
zero (a counter that only goes down is lowest at the end) and it went down by
exactly the units answered 2xx, so no unit was sold twice. A sale meant to sell
out must also have sold exactly its stock.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from gateway.bench.crowd import Tally
from gateway.bench.datastore import Datastore
from gateway.bench.servers import stock_key
from gateway.bench.systems import CAMPAIGN
from limiter.keys import CampaignKeys

#: Settling after start, then the quiet window a background rate is measured over.
SETTLE_SECONDS = 0.5
QUIET_SECONDS = 1.0


@dataclass
class Run:
    """One crowd against one system: what the crowd saw, what Redis and the backend did."""

    name: str
    tally: Tally
    #: Calls of each command during the run (INFO left out).
    commands: Counter[str] = field(default_factory=Counter)
    #: What sent the requests: the built-in crowd, or wrk.
    generator: str = "crowd"
    round_trips: float | None = None
    decided: int | None = None
    verdict: dict[str, Any] | None = None
    #: Redis commands a second with the system up and nobody buying, when measured.
    background: float | None = None
    #: Whether the system sells (its 2xx answers are winners), unlike hello or a backend.
    sells: bool = False
    #: The Redis it ran on (datastore.py's description).
    redis: str = ""

    @property
    def winners(self) -> int | None:
        if not self.sells:
            return None
        return sum(n for code, n in self.tally.outcomes.items() if code.startswith("2"))

    @property
    def redis_commands(self) -> int:
        return sum(self.commands.values())

    @property
    def script_calls(self) -> int:
        return self.commands["evalsha"] + self.commands["eval"]

    def net_commands_per_request(self) -> float | None:
        """Commands per request beyond the background rate (None: not measured)."""
        if self.background is None:
            return None
        left = self.redis_commands - self.background * self.tally.elapsed
        return round(max(0.0, left) / max(self.tally.sent, 1), 4)

    def summary(self) -> dict[str, Any]:
        tally = self.tally
        return {
            "generator": self.generator,
            "requests": tally.sent,
            "seconds": round(tally.elapsed, 3),
            "requests_per_second": round(tally.rate, 1),
            "p50_ms": round(tally.quantile(0.5) * 1000, 3),
            "p90_ms": round(tally.quantile(0.9) * 1000, 3),
            "p99_ms": round(tally.quantile(0.99) * 1000, 3),
            "outcomes": {
                code: _outcome(tally, code, count) for code, count in sorted(tally.outcomes.items())
            },
            "sent": sent(tally),
            "redis": self.redis,
            **self.redis_work(),
            "decided": self.decided,
            "upstream_calls": self.verdict.get("backend_calls") if self.verdict else None,
            "verdict": self.verdict,
        }

    def redis_work(self) -> dict[str, Any]:
        winners = self.winners
        per_winner = 1 / winners if winners else None
        trips = self.round_trips
        return {
            "redis_commands_per_request": round(self.redis_commands / max(self.tally.sent, 1), 4),
            "redis_background_commands_per_second": (
                round(self.background, 2) if self.background is not None else None
            ),
            "redis_commands_per_request_net": self.net_commands_per_request(),
            "redis_commands_by_name": dict(self.commands.most_common()),
            "winners": winners,
            "script_calls": self.script_calls,
            "script_calls_per_winner": _times(self.script_calls, per_winner),
            "redis_round_trips_per_winner": _times(trips, per_winner),
            "redis_round_trips_per_decision": (
                round(trips / max(self.decided, 1), 4)
                if trips is not None and self.decided is not None
                else None
            ),
        }


def _times(value: float | None, factor: float | None) -> float | None:
    return round(value * factor, 4) if value is not None and factor is not None else None


def sent(tally: Tally) -> dict[str, Any]:
    """What the crowd sent: its population, distinct users, requests with a key."""
    return {
        "buyers": tally.buyers,
        "distinct_users": tally.distinct_users,
        "issued": tally.issued,
        "keyed": tally.keyed,
        "keyed_share": round(tally.keyed / tally.issued, 4) if tally.issued else None,
    }


def _outcome(tally: Tally, code: str, count: int) -> dict[str, Any]:
    """How many answers had this outcome, and (when it can be known) how fast."""
    figures: dict[str, Any] = {"count": count}
    for share, name in ((0.5, "p50_ms"), (0.9, "p90_ms"), (0.99, "p99_ms")):
        seconds = tally.outcome_quantile(code, share)
        if seconds is not None:
            figures[name] = round(seconds * 1000, 3)
    return figures


async def background_rate(store: Datastore) -> float:
    """Redis commands a second with nobody buying, after a moment to settle."""
    await asyncio.sleep(SETTLE_SECONDS)
    before = await store.commands()
    await asyncio.sleep(QUIET_SECONDS)
    return sum((await store.commands() - before).values()) / QUIET_SECONDS


# ------------------------------------------------------------------ verdicts


async def reservation_books(
    redis: Redis, backend: str, tally: Tally, *, per_user_limit: int, sells_out: bool
) -> dict[str, Any]:
    """The books of a design that keeps reservations (flashgate, naive)."""
    state = await _state(redis, CampaignKeys(CAMPAIGN).state)
    return await _books([state], backend, tally, per_user_limit=per_user_limit, sells_out=sells_out)


async def sharded_books(
    shards: Sequence[tuple[Redis, str]],
    backend: str,
    tally: Tally,
    *,
    stock: int,
    per_user_limit: int,
    sells_out: bool,
) -> dict[str, Any]:
    """The same books of a campaign with ``shards: K`` (each shard's state hash, read on
    its node): every shard balances and the totals are checked as above; besides,
    nothing is left in flight between shards and the shards hold the campaign's stock."""
    states = [await _state(redis, key) for redis, key in shards]
    limit = per_user_limit
    verdict = await _books(states, backend, tally, per_user_limit=limit, sells_out=sells_out)
    in_flight = sum(s.get("out_units", 0) for s in states)
    checks = {
        "nothing_in_flight": in_flight == 0,
        "shards_hold_the_stock": verdict["stock_total"] + in_flight == stock,
    }
    verdict.update(checks)
    verdict["correct"] = verdict["correct"] and all(checks.values())
    verdict["shards"] = [{k: s.get(k, 0) for k in _FIGURES} for s in states]
    return verdict


_FIGURES = ("stock_total", "available", "reserved", "sold")


def _balances(state: dict[str, int]) -> bool:
    total, available, reserved, sold = (state.get(k, 0) for k in _FIGURES)
    return total == available + reserved + sold


async def _state(redis: Redis, key: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = await redis.hgetall(key)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items() if v.lstrip(b"-").isdigit()}


async def _books(
    states: Sequence[dict[str, int]],
    backend: str,
    tally: Tally,
    *,
    per_user_limit: int,
    sells_out: bool,
) -> dict[str, Any]:
    """The checks of a reservation design, on the counters of each shard (one when the
    campaign has one)."""
    seen = await asyncio.to_thread(_get_json, f"{backend}/_orders")
    units: dict[str, int] = {}
    for user, quantity in seen["orders"].values():
        units[user] = units.get(user, 0) + quantity
    delivered = sum(units.values())
    won = sum(quantity for _, quantity in tally.wins.values())
    total, sold = (sum(s.get(k, 0) for s in states) for k in ("stock_total", "sold"))
    checks = {
        "books_balance": all(_balances(s) for s in states),
        "sold_what_was_won": sold == won == delivered,
        "nobody_above_the_limit": all(u <= per_user_limit for u in units.values()),
        "backend_saw_exactly_the_winners": set(seen["orders"]) == set(tally.wins),
        "no_duplicate_deliveries": seen["duplicates"] == 0,
    }
    if sells_out:
        checks["sold_exactly_the_stock"] = sold == total
    return {
        "correct": all(checks.values()),
        **checks,
        "stock_total": total,
        "sold": sold,
        "oversold": max(0, delivered - total),
        "backend_calls": seen["calls"],
    }


async def counter_books(
    redis: Redis, tally: Tally, *, stock: int, sells_out: bool
) -> dict[str, Any]:
    """The books of the deduct-only design: one counter."""
    left = int(await redis.get(stock_key(CAMPAIGN)) or 0)
    won = sum(n for code, n in tally.outcomes.items() if code.startswith("2"))
    checks = {
        "counter_never_below_zero": left >= 0,
        "sold_what_was_won": stock - left == won,
    }
    if sells_out:
        checks["sold_exactly_the_stock"] = won == stock
    return {
        "correct": all(checks.values()),
        **checks,
        "stock_total": stock,
        "sold": stock - left,
        "oversold": max(0, won - stock, -left),
    }


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        document: dict[str, Any] = json.loads(response.read())
        return document
