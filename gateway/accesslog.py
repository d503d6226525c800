"""The access log: one JSON line per purchase request.

Lines are collected in memory and written in one system call four times a second,
so logging costs a dict, a ``json.dumps`` and a list append per request, not a
write. Refusals answered from memory (sold out, outside the sale window) are the
flood at peak: they are counted in the metrics and logged only when
``access_log.local_refusals`` asks for it (see docs/operations.md for the cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from datetime import UTC, datetime
from typing import IO

from gateway.config import AccessLogSettings

FLUSH_SECONDS = 0.25


class AccessLog:
    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = settings
        self._lines: list[str] = []
        self._stream: IO[str] | None = None

    def wants(self, local: bool) -> bool:
        return self.settings.enabled and (self.settings.local_refusals or not local)

    def record(
        self,
        *,
        campaign: str,
        user: str,
        code: str,
        status: int,
        seconds: float,
        reservation_id: str,
        client: str,
    ) -> None:
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "campaign": campaign,
            "user": user or None,
            "client": client,
            "code": code,
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
            "reservation_id": reservation_id or None,
        }
        self._lines.append(json.dumps(line, separators=(",", ":")))

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self._open()
        stream.write("\n".join(lines) + "\n")
        stream.flush()

    def _open(self) -> IO[str]:
        if self._stream is None:
            path = self.settings.path
            if path in ("-", "stderr"):
                self._stream = sys.stderr
            elif path == "stdout":
                self._stream = sys.stdout
            else:
                self._stream = open(path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        return self._stream

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                self.flush()
        finally:
            self.close()

    def close(self) -> None:
        self.flush()
        if self._stream is not None and self._stream not in (sys.stderr, sys.stdout):
            with contextlib.suppress(OSError):
                self._stream.close()
        self._stream = None
