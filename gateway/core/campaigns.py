"""A running campaign: its settings and the objects that serve it, built together
and replaced together on reload.

A campaign with ``shards: K`` has K shards, each a whole campaign's worth of Redis
keys under a hash tag of its own (limiter/keys.py), with its own store, reserve
batcher and settlement. A user's purchases are decided in the user's home shard
(by a hash of the user: quota, Idempotency-Keys and stock in one atomic script, as
with one shard); stock moves between the shards (core/rebalancer.py), never a
buyer's decision. One shard is the campaign as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.admission.room import WaitingRoom
from gateway.admission.shaping import Shaper
from gateway.config import CampaignSettings, Settings
from gateway.forwarding.settle import Settlement
from gateway.forwarding.upstream import Upstream
from gateway.problems import CannedProblem, Code, Problem
from limiter.batching import TickBatcher
from limiter.keys import CampaignKeys, home_shard, shard_keys, shard_of
from limiter.pipeline import AutoPipeline
from limiter.records import Attempt, Decision
from limiter.scripts import Scripts
from limiter.store import CampaignStore, StorePolicy
from limiter.waiting import QueuePolicy, QueueStore


@dataclass(eq=False, slots=True)
class Shard:
    """One shard of a campaign: what a dispatcher delivers from and settles into."""

    campaign: Campaign
    index: int
    store: CampaignStore
    #: reserve attempts of one event-loop tick -> one reserve.lua call
    batcher: TickBatcher[Attempt, Decision]
    settle: Settlement
    #: the same for items of carts (their order keeps their deadline)
    cart_batcher: TickBatcher[Attempt, Decision]

    @property
    def id(self) -> str:
        return self.campaign.id

    @property
    def key(self) -> str:
        """Names the shard among all campaigns' shards (a dispatcher loop each)."""
        return f"{self.campaign.id}#{self.index}"

    @property
    def settings(self) -> CampaignSettings:
        return self.campaign.settings

    @property
    def upstream(self) -> Upstream:
        return self.campaign.upstream


@dataclass(eq=False, slots=True)
class Campaign:
    settings: CampaignSettings
    #: its backend, as configured when this object was built
    upstream: Upstream
    shaper: Shaper
    #: its waiting room, if it has one
    room: WaitingRoom | None = None
    shards: tuple[Shard, ...] = ()
    sold_out: CannedProblem = field(init=False)

    def __post_init__(self) -> None:
        self.sold_out = CannedProblem(
            Problem(Code.SOLD_OUT, f"campaign {self.id} is sold out", campaign=self.id)
        )

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def store(self) -> CampaignStore:
        """Shard 0's store: the campaign itself when it has one shard, and where the
        campaign-wide keys (buckets, delivery slots) live."""
        return self.shards[0].store

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def home(self, user_id: str) -> Shard:
        """The shard that decides this user's purchases."""
        return self.shards[home_shard(user_id, len(self.shards))]

    def shard_for(self, reservation_id: str) -> Shard | None:
        """The shard a reservation lives in (None: an id no shard of this one makes)."""
        if len(self.shards) == 1:
            return self.shards[0]
        index = shard_of(reservation_id)
        return self.shards[index] if index < len(self.shards) else None


def store_for(
    settings: Settings, campaign: CampaignSettings, pipe: AutoPipeline, scripts: Scripts
) -> CampaignStore:
    """The Redis side of one campaign (of its shard 0 when it has several)."""
    return stores_for(settings, campaign, pipe, scripts)[0]


def stores_for(
    settings: Settings, campaign: CampaignSettings, pipe: AutoPipeline, scripts: Scripts
) -> list[CampaignStore]:
    """The Redis side of every shard of one campaign (also what operator tools use)."""
    policy = StorePolicy(
        per_user_limit=campaign.per_user_limit,
        # sync: the backend's answer settles it; queue: the 202 hands the order over
        reserve_deadline_ms=round(campaign.forward_deadline * 1000),
        ledger_max_length=settings.ledger.max_length,
        mode=campaign.forward,
    )
    keys: tuple[CampaignKeys, ...] = shard_keys(
        campaign.id, settings.redis.key_prefix, campaign.shards
    )
    return [CampaignStore(pipe, scripts, k, policy) for k in keys]


def queue_store_for(
    settings: Settings, campaign: CampaignSettings, pipe: AutoPipeline, scripts: Scripts
) -> QueueStore | None:
    """The Redis side of a campaign's waiting room (None: it has none); under the
    campaign's own tag, shard 0's."""
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
