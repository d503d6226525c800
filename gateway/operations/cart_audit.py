"""Reconciling carts: every order against its items' records in their campaigns.

A campaign's own audit counts a cart's items with the rest of its reservations (their
units are in its books). What only the cart can say is whether each order is whole:
an order committed has every item committed, one held every item held, one given back
no item still holding units, and one reserving or reserved no item settled. An order
whose items have not followed it yet (its mover died, a sweeper will) is "settling".
A repair brings the items of every order that is not whole to its state, as a sweeper
would; the reads are small commands, a few hundred orders per round trip.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.core.carts import item_step
from limiter.carts import CartItem, CartOrder, CartState, CartStore
from limiter.keys import shard_of
from limiter.records import ReleaseItem
from limiter.store import CampaignStore

#: Orders read per round trip.
CHUNK = 200
#: The item states each order state allows (None: no record, a reserve not made yet).
WHOLE: dict[CartState, frozenset[str | None]] = {
    CartState.RESERVING: frozenset({"reserved", None}),
    CartState.RESERVED: frozenset({"reserved"}),
    CartState.HELD: frozenset({"held"}),
    CartState.COMMITTED: frozenset({"committed"}),
    **{
        gone: frozenset({"released", "expired", "cancelled", None})
        for gone in (CartState.RELEASED, CartState.EXPIRED, CartState.CANCELLED)
    },
}


@dataclass
class CartAudit:
    cart_id: str
    #: orders by state
    orders: dict[str, int] = field(default_factory=dict)
    #: units of the cart's items, by campaign and by the item's state
    units: dict[str, dict[str, int]] = field(default_factory=dict)
    #: (order, item reservation, order state, item state) of orders not whole, at most 100
    broken: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: orders not whole, all of them (also past the 100 listed)
    broken_orders: int = 0
    #: orders whose items have not followed them yet (a sweeper finishes them)
    settling: int = 0
    #: orders a repair made whole
    repaired: int = 0
    #: orders a repair could not make whole (an item gone back to stock outside a
    #: committed or held order is not taken again behind the operator's back)
    unrepaired: list[str] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return self.broken_orders > 0


async def audit_cart(
    cart: CartStore,
    campaigns: Mapping[str, Sequence[CampaignStore]],
    *,
    repair: bool,
    actor: str,
) -> CartAudit:
    """``campaigns``: the stores of each campaign's shards, by campaign id."""
    found = CartAudit(cart.campaign_id)
    units: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    start = 0
    while True:
        ids = await cart.order_ids(start, CHUNK)
        start += len(ids)
        orders = await asyncio.gather(*(cart.reservation(i) for i in ids))
        for order in orders:
            if order is None:
                continue
            found.orders[order.state.value] = found.orders.get(order.state.value, 0) + 1
            states = await _item_states(order, campaigns)
            for item, state in zip(order.items, states, strict=True):
                units[item.campaign_id][state or "none"] += item.quantity
            if not order.applied:
                found.settling += 1
                continue
            wrong = [
                (order.id, i.reservation_id, order.state.value, s or "none")
                for i, s in zip(order.items, states, strict=True)
                if s not in WHOLE[order.state]
            ]
            if wrong:
                found.broken_orders += 1
                found.broken += wrong[: max(0, 100 - len(found.broken))]
                if repair and await _make_whole(order, campaigns, actor):
                    found.repaired += 1
                elif repair:
                    found.unrepaired.append(order.id)
        if len(ids) < CHUNK:
            break
    found.units = {cid: dict(counts) for cid, counts in sorted(units.items())}
    return found


async def _item_states(
    order: CartOrder, campaigns: Mapping[str, Sequence[CampaignStore]]
) -> list[str | None]:
    states: list[str | None] = []
    for item in order.items:
        store = _store_of(item, campaigns)
        record = await store.reservation(item.reservation_id) if store else None
        states.append(record.state.value if record else None)
    return states


def _store_of(
    item: CartItem, campaigns: Mapping[str, Sequence[CampaignStore]]
) -> CampaignStore | None:
    shards = campaigns.get(item.campaign_id)
    if not shards:
        return None
    index = shard_of(item.reservation_id) if len(shards) > 1 else 0
    return shards[index] if index < len(shards) else None


async def _make_whole(
    order: CartOrder, campaigns: Mapping[str, Sequence[CampaignStore]], actor: str
) -> bool:
    """Bring every item to a settled order's state (an order reserving or reserved is
    left to its gateway and its deadline)."""
    if order.state in (CartState.RESERVING, CartState.RESERVED):
        return False
    for item in order.items:
        store = _store_of(item, campaigns)
        if store is None:
            return False
        step = item_step(order, item)
        if isinstance(step, ReleaseItem):
            await store.release_all([step], actor)
        else:
            await store.commit_all([step], actor)
    states = await _item_states(order, campaigns)
    return all(state in WHOLE[order.state] for state in states)
