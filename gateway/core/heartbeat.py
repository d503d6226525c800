"""Counting the gateway processes that share a Redis, so that limits can fall back
to a fair local share while Redis is unreachable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from limiter.errors import StorageError
from limiter.pipeline import AutoPipeline
from limiter.scripts import Scripts

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
HEARTBEAT_TTL_MS = 5000


class Heartbeat:
    def __init__(
        self,
        pipe: AutoPipeline,
        scripts: Scripts,
        key: str,
        member: str,
        on_count: Callable[[int], None],
    ) -> None:
        self.pipe = pipe
        self.scripts = scripts
        self.key = key
        self.member = member
        self.on_count = on_count
        #: Gateway processes sharing this Redis, as last counted.
        self.processes = 1

    async def beat(self) -> None:
        alive = await self.pipe.script(
            self.scripts.heartbeat, [self.key], [self.member, HEARTBEAT_TTL_MS], "heartbeat"
        )
        self.processes = int(alive)
        self.on_count(self.processes)

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except StorageError as exc:
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)
