"""The running campaigns of a process, and the registry the router reads.

App state is frozen once aiohttp starts, so the runtime holds a registry object
and swaps in a new one on reload; a request keeps the snapshot it started with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.admission.shaping import Shaper
from gateway.config import CampaignSettings
from gateway.forwarding.upstream import Upstream
from gateway.problems import CannedProblem, Code, Problem
from limiter.batching import TickBatcher
from limiter.records import Attempt, Decision
from limiter.store import CampaignStore


@dataclass(eq=False, slots=True)
class Campaign:
    settings: CampaignSettings
    store: CampaignStore
    #: reserve attempts of one event-loop tick -> one reserve.lua call
    batcher: TickBatcher[Attempt, Decision]
    upstream: Upstream
    shaper: Shaper
    sold_out: CannedProblem = field(init=False)

    def __post_init__(self) -> None:
        self.sold_out = CannedProblem(
            Problem(Code.SOLD_OUT, f"campaign {self.id} is sold out", campaign=self.id)
        )

    @property
    def id(self) -> str:
        return self.settings.id


@dataclass(frozen=True, slots=True)
class Registry:
    by_id: Mapping[str, Campaign] = field(default_factory=lambda: MappingProxyType({}))
    #: path -> method -> campaign
    routes: Mapping[str, Mapping[str, Campaign]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def of(cls, campaigns: Iterable[Campaign]) -> Registry:
        by_id: dict[str, Campaign] = {}
        routes: dict[str, dict[str, Campaign]] = {}
        for campaign in campaigns:
            by_id[campaign.id] = campaign
            route = campaign.settings.route
            routes.setdefault(route.path, {})[route.method] = campaign
        return cls(MappingProxyType(by_id), MappingProxyType(routes))
