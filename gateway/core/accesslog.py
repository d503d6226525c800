"""The access log: one JSON line per purchase request.

Lines are built by hand, collected in memory and written in one system call four
times a second, so logging costs about 5 microseconds per request, not a write.
Refusals answered from memory (sold out, outside the sale window) are the flood
at peak: they are counted in the metrics and logged only when
``access_log.local_refusals`` asks for it (see docs/operations.md for the cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import IO

from gateway.config import AccessLogSettings
from limiter.logs import Throttled

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
_encode = json.JSONEncoder(ensure_ascii=True).encode


def _text(value: str) -> str:
    """A JSON string, or null for an empty one."""
    return _encode(value) if value else "null"


class AccessLog:
    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = settings
        self._lines: list[str] = []
        self._stream: IO[str] | None = None
        self._second = -1
        self._prefix = ""
        #: Lines lost to write errors (a full disk, a removed directory).
        self.dropped = 0
        self._errors = Throttled(log, every=10.0)

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
        # Built by hand: json.dumps of a dict costs several times as much, per request.
        self._lines.append(
            f'{{"time":"{self._timestamp()}","campaign":{_text(campaign)},'
            f'"user":{_text(user)},"client":{_text(client)},"code":{_text(code)},'
            f'"status":{status},"latency_ms":{seconds * 1000:.3f},'
            f'"reservation_id":{_text(reservation_id)}}}'
        )

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def flush(self) -> None:
        """Write the collected lines. A write error never reaches a buyer: the lines are
        dropped (and counted), and the file is opened afresh at the next flush."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            stream = self._open()
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: a stream closed under us
            self.dropped += len(lines)
            self._errors.log(
                logging.ERROR,
                "write",
                "access log %s unwritable (%s); %d lines dropped so far",
                self.settings.path,
                exc,
                self.dropped,
            )
            self._close_stream()

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

    def reconfigure(self, settings: AccessLogSettings) -> None:
        """New settings (a reload): what was collected goes where the old ones said."""
        if settings != self.settings:
            self.close()
            self.settings = settings

    def close(self) -> None:
        self.flush()
        self._close_stream()

    def _close_stream(self) -> None:
        if self._stream is not None and self._stream not in (sys.stderr, sys.stdout):
            with contextlib.suppress(OSError):
                self._stream.close()
        self._stream = None
