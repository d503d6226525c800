"""Hot reload (SIGHUP, or ``POST /reload`` on the admin port): re-read the YAML and
apply it without dropping a request.

New campaigns start, changed limits and backends apply, removed campaigns stop;
requests in flight finish with the objects they started with. Stock of a running
campaign is never reset (counters are created only when absent). A file that is
invalid, or that changes what only a restart can change (Redis, listening
addresses), is refused and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.admission.identity import identity_for
from gateway.config import ConfigError, Settings, load_settings
from gateway.core.campaigns import Registry
from gateway.forwarding.upstream import Upstream
from gateway.stats import RELOADS

if TYPE_CHECKING:
    from gateway.core.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reloaded:
    added: list[str]
    removed: list[str]
    kept: list[str]

    def summary(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "kept": self.kept}


def restart_only(old: Settings, new: Settings) -> list[tuple[str, str]]:
    """Fields a reload cannot change, as (path, reason) problems."""
    fixed = {
        "redis.url": (old.redis.url, new.redis.url),
        "redis.key_prefix": (old.redis.key_prefix, new.redis.key_prefix),
        "redis.max_connections": (old.redis.max_connections, new.redis.max_connections),
        "redis.wait_for_replicas": (old.redis.wait_for_replicas, new.redis.wait_for_replicas),
        "gateway.host": (old.gateway.host, new.gateway.host),
        "gateway.port": (old.gateway.port, new.gateway.port),
        "admin": (old.admin is None, new.admin is None),
    }
    if old.admin and new.admin:
        fixed["admin.host"] = (old.admin.host, new.admin.host)
        fixed["admin.port"] = (old.admin.port, new.admin.port)
        fixed["admin.metrics_need_token"] = (
            old.admin.metrics_need_token,
            new.admin.metrics_need_token,
        )
    return [(path, "changing it needs a restart") for path, (a, b) in fixed.items() if a != b]


async def reload_file(runtime: Runtime, path: str) -> Reloaded:
    """Load ``path`` and apply it; raises ConfigError (the running config stays).

    One reload at a time: a second SIGHUP while the first still prepares its campaigns
    waits, so the last file read is the one whose outcome stays (and is shown)."""
    async with runtime.reloading:
        return await _reload_file(runtime, path)


async def _reload_file(runtime: Runtime, path: str) -> Reloaded:
    try:
        new = load_settings(path)
        problems = restart_only(runtime.settings, new)
        if problems:
            raise ConfigError(path, problems)
        result = await apply(runtime, new)
    except ConfigError as exc:
        RELOADS.labels("failure").inc()
        runtime.reload_error = "; ".join(exc.lines())
        log.error("reload refused, the running configuration stays:\n%s", exc)
        raise
    RELOADS.labels("success").inc()
    runtime.reload_error = None
    log.info(
        "reloaded %s: %s",
        path,
        "; ".join(f"{what} {', '.join(ids) or 'none'}" for what, ids in result.summary().items()),
    )
    return result


async def apply(runtime: Runtime, new: Settings) -> Reloaded:
    old_campaigns = set(runtime.registry.by_id)
    retired = await _swap_upstreams(runtime, new)
    runtime.settings = new
    runtime.identity = identity_for(new.identity)
    runtime.max_body = new.gateway.max_body_bytes
    runtime.body_timeout = new.gateway.body_timeout
    runtime.guard.timeout = new.redis.timeout
    runtime.pipe.replica_timeout_ms = round(new.redis.replica_timeout * 1000)
    if new.access_log != runtime.access.settings:
        runtime.access.close()
        runtime.access.settings = new.access_log
    # Every campaign object is rebuilt (cheap); requests in flight keep the old ones.
    runtime.publisher.flush()  # the old campaigns' counts, before they are replaced
    runtime.registry = Registry.of(runtime.build_campaign(c) for c in new.campaigns)
    runtime.initialised &= set(runtime.registry.by_id)
    await runtime.prepare_or_retry()
    if retired:
        runtime.spawn(_close_later(retired, grace=max(u.settings.timeout for u in retired) + 1))
    new_campaigns = set(runtime.registry.by_id)
    return Reloaded(
        added=sorted(new_campaigns - old_campaigns),
        removed=sorted(old_campaigns - new_campaigns),
        kept=sorted(new_campaigns & old_campaigns),
    )


async def _swap_upstreams(runtime: Runtime, new: Settings) -> list[Upstream]:
    """Open changed and new backends; return the ones to close once their requests end."""
    upstreams: dict[str, Upstream] = {}
    for name, settings in new.upstreams.items():
        current = runtime.upstreams.get(name)
        if current is not None and current.settings == settings:
            upstreams[name] = current
        else:
            upstreams[name] = Upstream(name, settings)
            await upstreams[name].open()
    kept = {id(u) for u in upstreams.values()}
    retired = [u for u in runtime.upstreams.values() if id(u) not in kept]
    runtime.upstreams = upstreams
    return retired


async def _close_later(upstreams: list[Upstream], grace: float) -> None:
    await asyncio.sleep(grace)
    for upstream in upstreams:
        await upstream.close()
