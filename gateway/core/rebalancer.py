"""Moving stock between the shards of a campaign (``shards: K``), toward where it is
wanted, without pausing the sale.

A buyer's purchase is decided in the buyer's home shard; when that shard cannot
fill it, the gateway pulls units into it from the richest other shard (``pull``)
and asks again, so a buyer is told sold-out only when no shard has anything left.
A pull takes a share of the donor's units (its K-th), not half of them: the buyers of
one drained shard must not drain every other shard in turn. The buyers of one shard
waiting at once in one process share one pull.
Meanwhile one gateway process at a time (a lease in Redis) evens the shards out in
steps, so that pulls stay rare: a shard below a quarter of its fair share gets half
the difference from the richest.

A move is three atomic steps, each in the ledger of its shard: the units leave the
source into a transfer record (transfer_out.lua), join the target once however often
they are sent (transfer_in.lua), and the source forgets the transfer
(transfer_done.lua). A gateway that dies between the steps leaves the units in the
transfer record, counted as in flight; ``repair`` finishes such transfers after
their deadline. Every shard's books balance at every step; in total, the shards'
stock plus what is in flight is the campaign's stock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable

from gateway.core.campaigns import Campaign, Shard
from limiter.errors import CampaignMissing, StorageError

log = logging.getLogger(__name__)

#: How often the lease holder evens the shards out, and the lease's life.
EVEN_EVERY = 0.5
LEASE_MS = 3000
#: How often transfers cut short by a dead gateway are looked for (per shard).
REPAIR_EVERY = 1.0


class Rebalancer:
    def __init__(self, campaigns: Callable[[], Iterable[Campaign]], actor: str) -> None:
        self.campaigns = campaigns
        self.actor = actor
        #: Units moved by this process, for metrics and the bench.
        self.moved = 0
        #: The pull under way into each shard (by its key), that its buyers share.
        self._pulls: dict[str, asyncio.Future[int]] = {}

    async def pull(self, campaign: Campaign, into: Shard, want: int) -> int:
        """Move at least ``want`` units (a K-th of the donor's, when that is more) into
        shard ``into`` from the richest other shard that has some; the units moved (0:
        no other shard had any). A pull into the same shard already under way here is
        waited for instead."""
        running = self._pulls.get(into.key)
        if running is not None:
            return await asyncio.shield(running)
        pulling = asyncio.ensure_future(self._pull(campaign, into, want))
        self._pulls[into.key] = pulling
        pulling.add_done_callback(lambda _: self._pulls.pop(into.key, None))
        return await asyncio.shield(pulling)

    async def _pull(self, campaign: Campaign, into: Shard, want: int) -> int:
        donors = await self._balances(campaign, exclude=into)
        for donor, available in sorted(donors, key=lambda d: -d[1]):
            if available <= 0:
                break
            moved = await self.move(donor, into, max(want, available // len(campaign.shards)))
            if moved:
                return moved
        return 0

    async def in_flight(self, campaign: Campaign) -> int:
        """Units on their way between shards (they count as stock left)."""
        balances = [await shard.store.balance() for shard in campaign.shards]
        return sum(out for _, out in balances)

    async def move(self, source: Shard, target: Shard, units: int) -> int:
        transfer_id = os.urandom(8).hex()
        sent = await source.store.transfer_out(transfer_id, target.index, units, self.actor)
        if sent:
            await self._deliver(source, target, transfer_id, sent)
            self.moved += sent
        return sent

    async def _deliver(self, source: Shard, target: Shard, transfer_id: str, units: int) -> None:
        await target.store.transfer_in(transfer_id, source.index, units, self.actor)
        await source.store.transfer_done(transfer_id)

    async def _balances(
        self, campaign: Campaign, exclude: Shard | None = None
    ) -> list[tuple[Shard, int]]:
        shards = [s for s in campaign.shards if s is not exclude]
        found = await asyncio.gather(*(s.store.balance() for s in shards), return_exceptions=True)
        return [
            (shard, balance[0])
            for shard, balance in zip(shards, found, strict=True)
            if not isinstance(balance, BaseException)
        ]

    # --- in the background

    async def run(self) -> None:
        """Even out the shards of the campaigns this process holds the lease of, and
        finish transfers a dead gateway left in flight."""
        repaired_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(EVEN_EVERY)
            for campaign in [c for c in self.campaigns() if c.sharded]:
                with contextlib.suppress(StorageError):
                    if await self._holds_lease(campaign):
                        await self.even_out(campaign)
                if loop.time() - repaired_at >= REPAIR_EVERY:
                    await self.repair(campaign)
            if loop.time() - repaired_at >= REPAIR_EVERY:
                repaired_at = loop.time()

    async def _holds_lease(self, campaign: Campaign) -> bool:
        store, key = campaign.store, campaign.store.keys.rebalancer
        taken = await store.pipe.call(
            "SET", key, self.actor, "NX", "PX", LEASE_MS, what="take the rebalancing lease"
        )
        if taken:
            return True
        holder = await store.pipe.call("GET", key, what="read the rebalancing lease")
        if holder is not None and holder.decode() == self.actor:
            await store.pipe.call("PEXPIRE", key, LEASE_MS, what="keep the rebalancing lease")
            return True
        return False

    async def even_out(self, campaign: Campaign) -> int:
        """One step: half the difference from the richest shard to the poorest, when
        the poorest is below a quarter of the fair share."""
        balances = await self._balances(campaign)
        if len(balances) < 2:
            return 0
        total = sum(available for _, available in balances)
        poorest, low = min(balances, key=lambda b: b[1])
        richest, high = max(balances, key=lambda b: b[1])
        fair = total // len(balances)
        if low * 4 >= fair or (high - low) // 2 < 1:
            return 0
        return await self.move(richest, poorest, (high - low) // 2)

    async def repair(self, campaign: Campaign) -> int:
        """Finish the transfers of this campaign whose deadline passed (their gateway
        died between the steps); the transfers finished."""
        finished = 0
        for source in campaign.shards:
            try:
                for transfer_id, to, units in await source.store.due_transfers():
                    if to < len(campaign.shards):
                        await self._deliver(source, campaign.shards[to], transfer_id, units)
                        finished += 1
            except (StorageError, CampaignMissing) as exc:
                log.debug("transfers of %s not repaired: %s", campaign.id, exc)
        if finished:
            log.warning("campaign %s: %d transfer(s) cut short finished", campaign.id, finished)
        return finished
