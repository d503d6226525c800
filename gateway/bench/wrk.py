"""wrk as the load generator of throughput-only runs (sold-out, workers, access log).

On a machine whose cores the load generator shares with the servers it measures,
the generator's own cost per request caps what they can show: with the Python
crowd (about as costly per request as the gateway's sold-out path) two workers
compete with it for the second core. wrk, written in C, costs a few microseconds
per request. It is used when found on PATH (Debian and Ubuntu: ``apt-get install
wrk``); the report names the generator of every run. Sales that are checked for
correctness, and paced runs, always use the crowd: they need every answer.

Its Lua script sends what the crowd sends: buyers drawn from the same population,
and the same share of requests with an Idempotency-Key of their own, so that a
throughput run measures the path real clients take (a keyed request after sell-out
is not the unkeyed one).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections import Counter

from gateway.bench.crowd import Tally

MARK = "FLASHGATE-WRK "

#: Builds every request (wrk calls ``request`` for each): a buyer drawn from a
#: population of BUYERS, an Idempotency-Key of its own on a KEYED share of them, as
#: the crowd does (crowd.py). Counts answers by status, and what was sent (requests
#: with a key, distinct users), and prints a JSON summary at the end. One thread: its
#: count of distinct users is exact.
SCRIPT = """
local buyers, keyed_share = BUYERS, KEYED_SHARE
local body = '{"quantity": 1}'
local seen = {}
built, keyed, distinct = 0, 0, 0
statuses = {}
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args) math.randomseed(1 + id) end
function request()
  built = built + 1
  local user = "buyer-" .. math.random(0, buyers - 1)
  if not seen[user] then seen[user] = true; distinct = distinct + 1 end
  local headers = {["Content-Type"] = "application/json", ["X-User-Id"] = user}
  if keyed_share >= 1 or math.random() < keyed_share then
    keyed = keyed + 1
    headers["Idempotency-Key"] = '"wrk-' .. id .. '-' .. built .. '"'
  end
  return wrk.format("POST", nil, headers, body)
end
function response(status) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts, issued, sent_keyed, users = {}, 0, 0, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[#counts + 1] = string.format('"%d": %d', status, n)
    end
    issued = issued + thread:get("built")
    sent_keyed = sent_keyed + thread:get("keyed")
    users = users + thread:get("distinct")
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "errors": %d, "statuses": {%s}, '
    .. '"issued": %d, "keyed": %d, "distinct_users": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d}\\n',
    "MARK", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, table.concat(counts, ", "),
    issued, sent_keyed, users,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def script(buyers: int, keyed_share: float) -> str:
    """The Lua script for this population and share of keyed requests."""
    return (
        SCRIPT.replace('"MARK"', json.dumps(MARK))
        .replace("BUYERS", str(buyers))
        .replace("KEYED_SHARE", repr(float(keyed_share)))
    )


def available() -> bool:
    return shutil.which("wrk") is not None


async def run_wrk(
    url: str,
    *,
    seconds: float,
    concurrency: int,
    buyers: int = 1_000_000,
    keyed_share: float = 1.0,
) -> Tally:
    """Crowd ``url`` with wrk (one thread) for ``seconds``; what it saw, as a Tally."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="flashgate-wrk-") as file:
        file.write(script(buyers, keyed_share))
        file.flush()
        child = await asyncio.create_subprocess_exec(
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            file.name,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await child.communicate()
    lines = [line for line in out.decode().splitlines() if line.startswith(MARK)]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({child.returncode}): {(out + err).decode()[-1000:]}")
    tally = parse(lines[-1][len(MARK) :])
    tally.buyers = buyers
    return tally


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
        issued=figures["issued"],
        keyed=figures["keyed"],
        distinct_users=figures["distinct_users"],
    )
