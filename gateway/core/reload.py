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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.config import ConfigError, Settings, load_settings
from gateway.core.health import Readiness
from gateway.core.snapshot import SnapshotHolder
from gateway.stats import RELOADS

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
    problems = [(path, "changing it needs a restart") for path, (a, b) in fixed.items() if a != b]
    return problems + _reshard(old, new)


def _reshard(old: Settings, new: Settings) -> list[tuple[str, str]]:
    """A running campaign keeps its shards: its stock, quotas and records are spread
    over that many shards in Redis, which a reload cannot move."""
    before = {c.id: c.shards for c in old.campaigns}
    return [
        (
            f"campaigns[{i}].shards",
            f"campaign {c.id!r} runs on {before[c.id]} shard(s): its stock, quotas and "
            "records are spread over them in Redis; a new campaign id can have other shards",
        )
        for i, c in enumerate(new.campaigns)
        if c.id in before and before[c.id] != c.shards
    ]


class Reloader:
    """Reloads of one process, one at a time: a second SIGHUP while the first still
    prepares its campaigns waits, so the last file read is the one whose outcome stays
    (and is shown on /readyz)."""

    def __init__(
        self,
        live: SnapshotHolder,
        apply: Callable[[Settings], Awaitable[Reloaded]],
        readiness: Readiness,
        path: str | None,
    ) -> None:
        self.live = live
        self.apply = apply
        self.readiness = readiness
        #: The file a reload reads (None: settings given in code, nothing to reload).
        self.path = path
        self._lock = asyncio.Lock()

    def check(self, path: str) -> Settings:
        """The settings in ``path`` if a reload could apply them; raises ConfigError."""
        new = load_settings(path)
        problems = restart_only(self.live.current.settings, new)
        if problems:
            raise ConfigError(path, problems)
        return new

    async def reload(self) -> Reloaded:
        """Load the file and apply it; raises ConfigError (the running config stays)."""
        if self.path is None:
            raise ConfigError("<settings>", [("", "this gateway was not started from a file")])
        async with self._lock:
            return await self._reload(self.path)

    async def _reload(self, path: str) -> Reloaded:
        try:
            result = await self.apply(self.check(path))
        except ConfigError as exc:
            RELOADS.labels("failure").inc()
            self.readiness.reload_error = "; ".join(exc.lines())
            log.error("reload refused, the running configuration stays:\n%s", exc)
            raise
        RELOADS.labels("success").inc()
        self.readiness.reload_error = None
        summary = result.summary().items()
        log.info(
            "reloaded %s: %s",
            path,
            "; ".join(f"{what} {', '.join(ids) or 'none'}" for what, ids in summary),
        )
        return result
