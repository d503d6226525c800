"""The one door every Redis call goes through: a deadline and error wrapping.

A slow Redis must not make every request slow, so each call gets ``timeout``
seconds; whatever goes wrong comes out as ``StorageError`` and the gateway fails
closed on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from limiter.errors import StorageError

T = TypeVar("T")


class RedisGuard:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def run(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``call()`` within the deadline; ``what`` names it in the error."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except TimeoutError as exc:
            raise StorageError(f"redis did not answer {what} within {self.timeout:g}s") from exc
        except (RedisError, OSError) as exc:
            raise StorageError(f"redis failed {what}: {exc}") from exc
