"""A campaign's stock as one figure, however many shards hold it: totals, per-shard
figures, and live adjustments spread over the shards.

Each shard's change is atomic against buying in that shard (adjust_stock.lua), and
no shard ever goes below zero, so the campaign never does. A decrease takes from the
richest shards first; if buyers took some of those units meanwhile, what was taken
is put back and the change is refused, as one shard refuses a change below zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.core.campaigns import Campaign
from limiter.records import Adjustment, AdjustStatus, Figures

#: Rounds of reading the shards and taking from them, at most, for one decrease.
TAKE_ROUNDS = 10
#: Units on their way between shards: look again this soon.
IN_FLIGHT_WAIT = 0.01


async def shard_figures(campaign: Campaign) -> list[Figures]:
    """Every shard's counters (CampaignMissing when one has none)."""
    return list(await asyncio.gather(*(s.store.figures() for s in campaign.shards)))


def total(figures: Sequence[Figures]) -> Figures:
    return Figures(*(sum(column) for column in zip(*figures, strict=True)))


async def in_flight(campaign: Campaign) -> int:
    """Units on their way between shards: stock, but in no shard's counters yet."""
    if not campaign.sharded:
        return 0
    balances = await asyncio.gather(*(s.store.balance() for s in campaign.shards))
    return sum(out for _, out in balances)


async def decided(campaign: Campaign) -> int:
    return sum(await asyncio.gather(*(s.store.decided() for s in campaign.shards)))


async def adjust(
    campaign: Campaign, *, delta: int | None, set_to: int | None, actor: str
) -> Adjustment:
    """Change the campaign's available units by ``delta``, or set them to ``set_to``."""
    if not campaign.sharded:
        return await campaign.store.adjust(delta=delta, set_to=set_to, actor=actor)
    figures = await shard_figures(campaign)
    available = sum(f.available for f in figures)
    change = (set_to - available) if set_to is not None else (delta or 0)
    if available + change < 0:
        return Adjustment(AdjustStatus.BELOW_ZERO, total(figures))
    if change >= 0:
        await _add(campaign, change, actor)
    elif not await _take(campaign, -change, actor):
        return Adjustment(AdjustStatus.BELOW_ZERO, total(await shard_figures(campaign)))
    return Adjustment(AdjustStatus.DONE, total(await shard_figures(campaign)))


async def _add(campaign: Campaign, units: int, actor: str) -> None:
    count = len(campaign.shards)
    for shard in campaign.shards:
        share = units // count + (1 if shard.index < units % count else 0)
        if share:
            await shard.store.adjust(delta=share, actor=actor)


async def _take(campaign: Campaign, units: int, actor: str) -> bool:
    """Take ``units`` from the shards, richest first, reading them afresh each round
    (buyers take units meanwhile, and the rebalancer moves them between shards); False,
    and every unit put back, when fewer than that are left."""
    taken: list[tuple[int, int]] = []
    for _ in range(TAKE_ROUNDS):
        figures = await shard_figures(campaign)
        took = False
        for index in sorted(range(len(figures)), key=lambda j: -figures[j].available):
            want = min(units, figures[index].available)
            if want <= 0:
                continue
            result = await campaign.shards[index].store.adjust(delta=-want, actor=actor)
            if result.status is AdjustStatus.DONE:  # else a buyer was quicker: next round
                taken.append((index, want))
                units -= want
                took = True
        if units == 0:
            return True
        if not took:
            if not await in_flight(campaign):
                break
            await asyncio.sleep(IN_FLIGHT_WAIT)  # units between two shards land soon
    for index, amount in taken:
        await campaign.shards[index].store.adjust(delta=amount, actor=actor)
    return False
