"""What a reload changes, as one frozen value, and the holder that swaps it.

aiohttp freezes app state at startup, so components hold the holder, never a value
taken from it: a request reads ``holder.current`` once and keeps that snapshot to
the end (its campaign, its backend, its identity rules), while a reload builds a
whole new snapshot and swaps it in one assignment. A reload that fails leaves the
old one in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.admission.identity import Identity
from gateway.config import Settings
from gateway.core.campaigns import Campaign
from gateway.core.carts import Cart
from gateway.forwarding.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Snapshot:
    settings: Settings
    campaigns: Mapping[str, Campaign]
    #: path -> method -> the campaign or cart sold there
    routes: Mapping[str, Mapping[str, Campaign | Cart]]
    upstreams: Mapping[str, Upstream]
    identity: Identity
    #: waiting-room path -> (campaign, endpoint): "queue", "challenge" or "page"
    queues: Mapping[str, tuple[Campaign, str]]
    carts: Mapping[str, Cart]

    @classmethod
    def of(
        cls,
        settings: Settings,
        campaigns: Iterable[Campaign],
        upstreams: Mapping[str, Upstream],
        identity: Identity,
        carts: Callable[[Mapping[str, Campaign]], Iterable[Cart]] = lambda campaigns: (),
    ) -> Snapshot:
        """``carts`` builds the carts from the campaigns (they sell those objects)."""
        by_id: dict[str, Campaign] = {}
        routes: dict[str, dict[str, Campaign | Cart]] = {}
        queues: dict[str, tuple[Campaign, str]] = {}
        for campaign in campaigns:
            by_id[campaign.id] = campaign
            route = campaign.settings.route
            routes.setdefault(route.path, {})[route.method] = campaign
            if campaign.room is not None:
                base = campaign.room.join_path
                queues[base] = (campaign, "queue")
                queues[f"{base}/challenge"] = (campaign, "challenge")
                queues[f"{base}/page"] = (campaign, "page")
        by_cart: dict[str, Cart] = {}
        for cart in carts(by_id):
            by_cart[cart.id] = cart
            route = cart.settings.route
            routes.setdefault(route.path, {})[route.method] = cart
        return cls(
            settings,
            MappingProxyType(by_id),
            MappingProxyType({path: MappingProxyType(m) for path, m in routes.items()}),
            MappingProxyType(dict(upstreams)),
            identity,
            MappingProxyType(queues),
            MappingProxyType(by_cart),
        )


class SnapshotHolder:
    """The snapshot in force."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    def campaigns(self) -> Mapping[str, Campaign]:
        """The campaigns in force now (a callable for loops that outlive a reload)."""
        return self.current.campaigns
