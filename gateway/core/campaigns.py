"""A running campaign: its settings and the objects that serve it, built together
and replaced together on reload."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.admission.room import WaitingRoom
from gateway.admission.shaping import Shaper
from gateway.config import CampaignSettings, Settings
from gateway.forwarding.settle import Settlement
from gateway.forwarding.upstream import Upstream
from gateway.problems import CannedProblem, Code, Problem
from limiter.batching import TickBatcher
from limiter.keys import CampaignKeys
from limiter.pipeline import AutoPipeline
from limiter.records import Attempt, Decision
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from limiter.waiting import QueuePolicy, QueueStore


@dataclass(eq=False, slots=True)
class Campaign:
    settings: CampaignSettings
    store: CampaignStore
    #: reserve attempts of one event-loop tick -> one reserve.lua call
    batcher: TickBatcher[Attempt, Decision]
    #: its backend, as configured when this object was built
    upstream: Upstream
    shaper: Shaper
    settle: Settlement
    #: its waiting room (waiting_room), whose pass buying then needs
    room: WaitingRoom | None = None
    sold_out: CannedProblem = field(init=False)

    def __post_init__(self) -> None:
        self.sold_out = CannedProblem(
            Problem(Code.SOLD_OUT, f"campaign {self.id} is sold out", campaign=self.id)
        )

    @property
    def id(self) -> str:
        return self.settings.id


def store_for(
    settings: Settings, campaign: CampaignSettings, pipe: AutoPipeline, scripts: Scripts
) -> CampaignStore:
    """The Redis side of one campaign (also what the operator tools use)."""
    policy = StorePolicy(
        per_user_limit=campaign.per_user_limit,
        # sync: the backend's answer settles it; queue: the 202 hands the order over
        reserve_deadline_ms=round(campaign.forward_deadline * 1000),
        ledger_max_length=settings.ledger.max_length,
        mode=campaign.forward,
    )
    keys = CampaignKeys(campaign.id, settings.redis.key_prefix)
    return CampaignStore(pipe, scripts, keys, policy)


def queue_store_for(
    settings: Settings, campaign: CampaignSettings, pipe: AutoPipeline, scripts: Scripts
) -> QueueStore | None:
    """The Redis side of a campaign's waiting room (None: it has none)."""
    room = campaign.waiting_room
    if room is None:
        return None
    policy = QueuePolicy(
        mode=room.mode,
        starts_at_ms=round(campaign.starts_at.timestamp() * 1000) if campaign.starts_at else 0,
        admit_rate=room.admit_rate,
        max_passes_per_unit=room.max_passes_per_unit,
        close_factor=room.close_factor,
        pass_ttl_ms=round(room.pass_ttl * 1000),
        heartbeat_ms=round(room.heartbeat * 1000),
    )
    return QueueStore(pipe, scripts, CampaignKeys(campaign.id, settings.redis.key_prefix), policy)
