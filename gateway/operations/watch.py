"""``flashgate status --watch``: one line per campaign every interval, like
``redis-cli --stat``: the counters read from Redis and what sold since the last line,
a header again every screenful. Stops on Ctrl-C (exit 130)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from gateway.config import Settings
from gateway.operations.status import status

#: Lines between two headers.
SCREEN = 20
COLUMNS = ("time", "campaign", "available", "reserved", "sold", "sold/s", "books")


def line(
    row: Mapping[str, Any], previous: Mapping[str, Any] | None, seconds: float, at: float
) -> list[str]:
    sold, before = row.get("sold"), (previous or {}).get("sold")
    rate = (
        f"{(sold - before) / seconds:.1f}"
        if isinstance(sold, int) and isinstance(before, int) and seconds > 0
        else "-"
    )
    books = {True: "ok", False: "DRIFT", None: "-"}[row.get("balanced")]
    return [
        time.strftime("%H:%M:%S", time.localtime(at)),
        str(row["id"]),
        _shown(row.get("available")),
        _shown(row.get("reserved")),
        _shown(sold),
        rate,
        books,
    ]


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)


def render(lines: Sequence[list[str]], header: bool) -> str:
    widths = [max(12, len(c)) for c in COLUMNS]
    out = [" ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))] if header else []
    out += [" ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


async def watch(
    settings: Settings, redis_url: str, interval: float, as_json: bool, out: TextIO = sys.stdout
) -> None:
    """Until interrupted; ``as_json``: one JSON object per line instead."""
    previous: dict[str, Mapping[str, Any]] = {}
    last = time.monotonic()
    printed = 0
    while True:
        rows = await status(settings, redis_url)
        now = time.monotonic()
        seconds, last = now - last, now
        if as_json:
            for row in rows:
                print(json.dumps({"time": time.time(), **row}), file=out, flush=True)
        else:
            lines = [line(r, previous.get(r["id"]), seconds, time.time()) for r in rows]
            print(render(lines, header=printed % SCREEN == 0), file=out, flush=True)
            printed += 1
        previous = {r["id"]: r for r in rows}
        await asyncio.sleep(interval)
