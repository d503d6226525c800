"""Errors of the gateway side (the Redis side has limiter.errors)."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(Exception):
    """A configuration file that cannot be used; every problem names its field path."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [
            f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}"
            for path, reason in self.problems
        ]


class UpstreamError(Exception):
    """The order backend could not be reached or failed to answer in time."""

    def __init__(self, detail: str, *, timed_out: bool) -> None:
        super().__init__(detail)
        self.timed_out = timed_out
