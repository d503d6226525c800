"""A running cart: one order of several items, each from its own campaign, all or
nothing.

No script can span the items' slots, so an order goes in steps, each atomic and
recorded (limiter/carts.py has the states):

1. its record is opened, naming the reservation each item will get, with a deadline;
2. each item is reserved in its own campaign (its user's home shard), as any purchase;
3. if every item was, the order moves to "reserved" and goes to the backend as one;
   if one was not, the order moves to "released" and the others are given back;
4. the backend's answer moves the order (committed, held or released), and every item
   follows; confirm, cancel and the hold's end move the whole order the same way.

Whoever moves an order brings its items along (``apply``) and then says so
(cart_settled.lua). Should it die first, the order's deadline brings a sweeper, which
does the same (``CartSweep``): an order its gateway left "reserving" is rolled back
(items never reserved get tombstones, so a reserve that arrives late cannot make
them), one left unsettled after the backend's answer is delivered again, and one whose
items do not follow its state yet is applied again (each step is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config import CartSettings, Settings
from gateway.core.campaigns import Campaign, Shard
from gateway.forwarding.settle import now_or_in_background, stored_reply
from gateway.forwarding.upstream import Upstream, UpstreamReply
from limiter.carts import GONE, CartItem, CartOrder, CartPolicy, CartState, CartStore, Move
from limiter.carts import MoveStatus as Moved
from limiter.errors import StorageError
from limiter.keys import cart_keys
from limiter.pipeline import AutoPipeline
from limiter.records import (
    CommitItem,
    CommitStatus,
    ReleaseItem,
    ReleaseStatus,
    State,
    Transition,
)
from limiter.reserving import Spawn
from limiter.scripts import Scripts

log = logging.getLogger(__name__)

#: How long whoever moved an order has to bring its items along before a sweeper
#: does it instead (ms).
APPLY_GRACE_MS = 5_000
#: Reserving an order's items may take this many Redis deadlines (at least
#: ``RESERVE_WINDOW_MIN_MS``) before a sweeper rolls it back: a purchase makes a few
#: round trips per item, and a sharded campaign may pull stock first.
RESERVE_WINDOW_DEADLINES = 20
RESERVE_WINDOW_MIN_MS = 2_000
#: Orders one sweep looks at, at most.
SWEEP_BATCH = 100
#: The live states an operator's cancel takes an order from.
CANCELLABLE = (CartState.RESERVED, CartState.HELD, CartState.COMMITTED)
#: The item states an order's release gives back from.
ITEM_LIVE = (State.RESERVED, State.HELD, State.COMMITTED)


@dataclass(eq=False, slots=True)
class Cart:
    settings: CartSettings
    #: its backend, as configured when this object was built
    upstream: Upstream
    store: CartStore
    #: the campaigns it may sell, by id (of the same snapshot)
    campaigns: Mapping[str, Campaign]
    actor: str
    spawn: Spawn
    settle: CartSettlement = field(init=False)

    def __post_init__(self) -> None:
        self.settle = CartSettlement(self)

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def key(self) -> str:
        """Names the cart among the campaigns' shards and the carts (a dispatcher loop)."""
        return f"cart:{self.id}"

    def shard_of(self, item: CartItem) -> Shard | None:
        campaign = self.campaigns.get(item.campaign_id)
        return campaign.shard_for(item.reservation_id) if campaign is not None else None

    async def items_now(self, order: CartOrder) -> list[dict[str, object]]:
        """Each item of the order with its own state (None: no record yet)."""
        found = []
        for item in order.items:
            shard = self.shard_of(item)
            record = await shard.store.reservation(item.reservation_id) if shard else None
            found.append({**item.public(), "state": record.state.value if record else None})
        return found


def cart_store_for(
    settings: Settings, cart: CartSettings, pipe: AutoPipeline, scripts: Scripts
) -> CartStore:
    """The Redis side of one cart (also what operator tools use)."""
    window = max(
        RESERVE_WINDOW_MIN_MS, round(settings.redis.timeout * 1000 * RESERVE_WINDOW_DEADLINES)
    )
    policy = CartPolicy(
        reserve_window_ms=window,
        ledger_max_length=settings.ledger.max_length,
        mode=cart.forward,
    )
    return CartStore(pipe, scripts, cart_keys(cart.id, settings.redis.key_prefix), policy)


class CartSettlement:
    """Moving a cart's orders and bringing their items along; the dispatcher's and the
    sync forward's settling for carts."""

    def __init__(self, cart: Cart) -> None:
        self.cart = cart

    @property
    def store(self) -> CartStore:
        return self.cart.store

    async def move(self, order_id: str, move: Move, actor: str | None = None) -> Transition:
        """Move the order, then bring its items along (also when an earlier mover left
        that undone); StorageError if Redis failed (the deadline finishes the job)."""
        result = await self.store.move(order_id, move, actor or self.cart.actor)
        if result.status in (Moved.MOVED, Moved.ALREADY) and move.target is not CartState.RESERVED:
            order = await self.store.reservation(order_id)
            if order is not None and not order.applied:
                await self.apply(order)
        return result

    async def apply(self, order: CartOrder) -> None:
        """Bring every item to the order's state, then say so; StorageError if Redis
        failed on the way (a sweeper applies it again: each step is idempotent)."""
        state = order.state
        if state in (CartState.RESERVING, CartState.RESERVED):
            return
        await asyncio.gather(*(self._apply_item(order, item) for item in order.items))
        await self.store.settled(order.id, state)

    async def _apply_item(self, order: CartOrder, item: CartItem) -> None:
        shard = self.cart.shard_of(item)
        if shard is None:
            # a reload removed the campaign (or it was never one): kept for when it returns
            raise StorageError(
                f"cart order {order.id}: campaign {item.campaign_id} is not configured; its "
                "item waits",
                maybe_applied=False,
            )
        step = item_step(order, item)
        if isinstance(step, ReleaseItem):
            released = await shard.settle.releases.submit(step)
            _unless_counters_missing(shard, released, ReleaseStatus.NOT_FOUND)
            return
        result = await shard.settle.commits.submit(step)
        _unless_counters_missing(shard, result, CommitStatus.NOT_FOUND)
        if result.status in (CommitStatus.GONE, CommitStatus.NOT_FOUND):
            log.error(
                "cart order %s is %s but its item %s is %s: it went back to stock outside "
                "its order (reconcile lists it)",
                order.id,
                order.state.value,
                item.reservation_id,
                result.state or "missing",
            )

    # --- the backend's answer (sync forward and dispatcher alike)

    async def commit_accepted(self, rid: str, reply: UpstreamReply) -> None:
        s = self.cart.settings
        hold = s.on_success == "hold"
        move = Move(
            (CartState.RESERVED,),
            CartState.HELD if hold else CartState.COMMITTED,
            deadline_ms=APPLY_GRACE_MS,
            hold_ms=round(s.hold_seconds * 1000) if hold else 0,
            reply=stored_reply(reply),
        )
        result = await self.move(rid, move)
        if result.status is Moved.NOT_ALLOWED:
            log.error(
                "cart order %s was %s before the backend accepted it: the backend holds an "
                "order flashgate did not count (cancel it there)",
                rid,
                result.state,
            )

    async def release_refused(self, rid: str, reason: str, dead_letter: bytes = b"") -> None:
        move = Move(
            (CartState.RESERVED,),
            CartState.RELEASED,
            deadline_ms=APPLY_GRACE_MS,
            reason=reason,
            dead_letter=dead_letter,
        )
        await self.move(rid, move)

    async def cancel(self, order_id: str, actor: str) -> Transition:
        """An operator's cancel of the whole order (also of a sale: an after-sale
        return); a second cancel changes nothing."""
        move = Move(
            CANCELLABLE,
            CartState.CANCELLED,
            deadline_ms=APPLY_GRACE_MS,
            reason="cancelled by an operator",
        )
        return await self.move(order_id, move, actor)

    async def confirm(self, order_id: str, actor: str) -> Transition:
        """The backend says a held order was paid: every item is sold. A hold past its
        end expires now instead (HOLD_RAN_OUT), even if no sweeper has come by yet."""
        expire = Move(
            (CartState.HELD,),
            CartState.EXPIRED,
            due=True,
            deadline_ms=APPLY_GRACE_MS,
            reason="hold ran out",
        )
        if (await self.move(order_id, expire, actor)).status is Moved.MOVED:
            return Transition(Moved.HOLD_RAN_OUT, CartState.EXPIRED.value)
        move = Move((CartState.HELD,), CartState.COMMITTED, deadline_ms=APPLY_GRACE_MS)
        return await self.move(order_id, move, actor)

    async def keep_reply(self, rid: str, reply: UpstreamReply) -> None:
        kept = stored_reply(reply)
        if kept is not None:
            # the refusal stands; only its text for the buyer's poll could be lost
            with contextlib.suppress(StorageError):
                await self.store.keep_reply(rid, kept)

    async def settle_accepted(self, rid: str, reply: UpstreamReply) -> None:
        """Commit (or hold) an accepted order; if Redis fails, keep trying in the
        background (and failing that, the order's deadline redelivers it)."""
        await now_or_in_background(
            self.cart.spawn,
            self.cart.settings.forward_deadline,
            f"commit of {rid}",
            lambda: self.commit_accepted(rid, reply),
        )

    async def give_back(self, rid: str, reason: str) -> None:
        await now_or_in_background(
            self.cart.spawn,
            self.cart.settings.forward_deadline,
            f"release of {rid}",
            lambda: self.release_refused(rid, reason),
        )

    async def roll_back(self, rid: str, reason: str, *, unheard: bool = False) -> None:
        """An order whose items could not all be had: release it and give back the ones
        that were (in the background if Redis fails; failing that, its deadline).
        ``unheard``: Redis did not confirm its move to reserved, which may have happened
        (nothing was sent to the backend yet)."""
        leavable = (CartState.RESERVING, CartState.RESERVED) if unheard else (CartState.RESERVING,)
        move = Move(leavable, CartState.RELEASED, deadline_ms=APPLY_GRACE_MS, reason=reason)

        async def attempt() -> None:
            await self.move(rid, move)

        await now_or_in_background(
            self.cart.spawn, APPLY_GRACE_MS / 1000, f"roll-back of {rid}", attempt
        )


def item_step(order: CartOrder, item: CartItem) -> CommitItem | ReleaseItem:
    """What brings one item to its settled order's state: a release (with a tombstone
    where nothing was reserved: a reserve arriving late cannot make it) or a commit."""
    if order.state in GONE:
        reason = order.reason or f"cart order {order.id} {order.state.value}"
        target = State(order.state.value)
        return ReleaseItem(item.reservation_id, ITEM_LIVE, target, reason, tombstone=True)
    return CommitItem(
        item.reservation_id,
        State.COMMITTED if order.state is CartState.COMMITTED else State.HELD,
        hold_ms=1,  # an item of a cart keeps no deadline of its own (commit.lua)
        leavable=(State.RESERVED, State.HELD),
    )


def _unless_counters_missing(shard: Shard, result: Transition, not_found: int) -> None:
    """An item whose campaign has no counters (Redis lost them) cannot follow yet."""
    if result.status == not_found and result.state:
        raise StorageError(
            f"campaign {shard.id} has no counters in Redis; its cart items wait",
            maybe_applied=False,
        )


class CartSweep:
    """A cart's deadlines, as the sweeper sees them (see the module's docstring)."""

    def __init__(self, cart: Cart) -> None:
        self.cart = cart

    @property
    def name(self) -> str:
        return self.cart.store.name

    async def earliest_deadline(self) -> int | None:
        return await self.cart.store.earliest_deadline()

    async def sweep(self, actor: str) -> int:
        settled = 0
        while True:
            due = await self.cart.store.due(SWEEP_BATCH)
            done = 0
            for order_id in due:
                order = await self.cart.store.reservation(order_id)
                if order is not None and await self._finish(order, actor):
                    done += 1
            settled += done
            if len(due) < SWEEP_BATCH or done == 0:
                return settled

    async def _finish(self, order: CartOrder, actor: str) -> bool:
        settle = self.cart.settle
        if not order.applied:  # moved, and its mover died before its items followed
            await settle.apply(order)
            log.warning("cart order %s: its items follow its state (%s) now", order.id, order.state)
            return True
        match order.state:
            case CartState.RESERVING:
                reason = "its gateway did not finish reserving its items in time"
                move = Move(
                    (CartState.RESERVING,),
                    CartState.RELEASED,
                    due=True,
                    deadline_ms=APPLY_GRACE_MS,
                    reason=reason,
                )
                log.warning("cart order %s: %s; rolled back", order.id, reason)
            case CartState.RESERVED:
                # never handed over (queue), or unsettled at its deadline (sync): deliver
                move = Move((CartState.RESERVED,), CartState.RESERVED, due=True, hand_over=True)
                log.warning("cart order %s: unsettled at its deadline; delivering it", order.id)
            case CartState.HELD:
                move = Move(
                    (CartState.HELD,),
                    CartState.EXPIRED,
                    due=True,
                    deadline_ms=APPLY_GRACE_MS,
                    reason="hold ran out",
                )
            case _:
                return False
        result = await settle.move(order.id, move, actor)
        return result.status is Moved.MOVED
