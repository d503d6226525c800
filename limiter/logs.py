"""Logging a problem that recurs on every request (Redis down, a campaign missing)
at most once per interval, with how often it happened meanwhile: an outage must
not become a log flood."""

from __future__ import annotations

import logging
import time


class Throttled:
    def __init__(self, logger: logging.Logger, every: float = 5.0) -> None:
        self.logger = logger
        self.every = every
        #: key -> (when it was last logged, occurrences since)
        self._seen: dict[str, tuple[float, int]] = {}

    def log(
        self, level: int, key: str, message: str, *args: object, exc_info: bool = False
    ) -> None:
        now = time.monotonic()
        last, since = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.every:
            self._seen[key] = (last, since + 1)
            return
        self._seen[key] = (now, 0)
        if since:
            message += " (and %d more times in the last %.0fs)"
            args = (*args, since, now - last)
        self.logger.log(level, message, *args, exc_info=exc_info)
