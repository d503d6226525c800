"""The error a configuration that cannot be used raises."""

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
