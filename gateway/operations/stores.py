"""The campaigns' stores for operator commands that work on Redis directly, on a
client of their own with a deadline fit for the command."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.config import Settings
from gateway.core.campaigns import stores_for
from limiter.guard import RedisGuard
from limiter.pipeline import AutoPipeline
from limiter.scripts import Scripts
from limiter.store import CampaignStore

#: Operator tools may run big scripts (an audit reads every reservation).
TOOL_TIMEOUT = 30.0
#: ``status`` reads a few keys per campaign: a hung Redis should not keep it waiting.
STATUS_TIMEOUT = 3.0


class UnknownCampaign(LookupError):
    pass


@contextlib.asynccontextmanager
async def tool_pipeline(
    settings: Settings, redis_url: str, deadline: float = TOOL_TIMEOUT
) -> AsyncIterator[tuple[AutoPipeline, Scripts]]:
    """An auto-pipeline of the tool's own, with the scripts."""
    guard = RedisGuard(deadline)
    try:
        async with AutoPipeline.opened(
            redis_url, guard, sentinel_password=settings.redis.sentinel_password
        ) as pipe:
            yield pipe, Scripts.read()
    finally:
        guard.close()


@contextlib.asynccontextmanager
async def campaign_stores(
    settings: Settings, redis_url: str, only: str | None = None, deadline: float = TOOL_TIMEOUT
) -> AsyncIterator[list[list[CampaignStore]]]:
    """Per campaign (of the file, or ``only``), the stores of its shards."""
    campaigns = [c for c in settings.campaigns if only is None or c.id == only]
    if only is not None and not campaigns:
        raise UnknownCampaign(f"no campaign {only!r} in the config")
    async with tool_pipeline(settings, redis_url, deadline) as (pipe, scripts):
        yield [stores_for(settings, c, pipe, scripts) for c in campaigns]
