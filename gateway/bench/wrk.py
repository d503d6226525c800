"""wrk as the load generator of throughput-only runs (sold-out, workers, access log).

On a machine whose cores the load generator shares with the servers it measures,
the generator's own cost per request caps what they can show: with the Python
crowd (about as costly per request as the gateway's sold-out path) two workers
compete with it for the second core. wrk, written in C, costs a few microseconds
per request. It is used when found on PATH (Debian and Ubuntu: ``apt-get install
wrk``); the report names the generator of every run. Sales that are checked for
correctness, and paced runs, always use the crowd: they need every answer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections import Counter

from gateway.bench.crowd import Tally

MARK = "FLASHGATE-WRK "

#: Counts answers by status in each thread, and prints a JSON summary at the end.
SCRIPT = """
wrk.method = "POST"
wrk.body = '{"quantity": 1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-User-Id"] = "wrk-buyer"
statuses = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[#counts + 1] = string.format('"%d": %d', status, n)
    end
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "errors": %d, "statuses": {%s}, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d}\\n',
    "MARK", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, table.concat(counts, ", "),
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
""".replace('"MARK"', json.dumps(MARK))


def available() -> bool:
    return shutil.which("wrk") is not None


async def run_wrk(url: str, *, seconds: float, concurrency: int) -> Tally:
    """Crowd ``url`` with wrk (one thread) for ``seconds``; what it saw, as a Tally."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="flashgate-wrk-") as script:
        script.write(SCRIPT)
        script.flush()
        child = await asyncio.create_subprocess_exec(
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            script.name,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await child.communicate()
    lines = [line for line in out.decode().splitlines() if line.startswith(MARK)]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({child.returncode}): {(out + err).decode()[-1000:]}")
    return parse(lines[-1][len(MARK) :])


def parse(summary: str) -> Tally:
    figures = json.loads(summary)
    outcomes = Counter({status: n for status, n in figures["statuses"].items()})
    if figures["errors"]:
        outcomes["connection-lost"] += figures["errors"]
    return Tally(
        outcomes=outcomes,
        sent=figures["requests"],
        elapsed=figures["duration_us"] / 1e6,
        quantiles={share: figures[f"p{round(share * 100)}_us"] / 1e6 for share in (0.5, 0.9, 0.99)},
    )
