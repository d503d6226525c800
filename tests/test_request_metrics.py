"""The end-to-end request duration histogram (per campaign and outcome class; answers
from memory counted, not timed) and flashgate_build_info."""

from __future__ import annotations

import platform
import re

from gateway.core.publisher import outcome_class
from gateway.stats import VERSION
from tests.helpers import AUTH, Gateway


def count(text: str, outcome: str) -> float:
    pattern = (
        r'^flashgate_request_duration_seconds_count\{campaign="phone-1111",'
        rf'outcome="{outcome}"\}} (\S+)$'
    )
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_purchases_are_timed_by_outcome_class(gateway: Gateway) -> None:
    before = await (await gateway.admin.get("/metrics")).text()
    assert (await gateway.buy("alice")).status == 201
    assert (await gateway.buy("alice")).status == 403  # over the limit: refused, by Redis
    await gateway.admin.post("/campaigns/phone-1111/stock", json={"set": 0}, headers=AUTH)
    for user in ("bob", "carol"):  # the admin call raised the flag: from memory, not timed
        assert (await gateway.buy(user)).status == 409
    after = await (await gateway.admin.get("/metrics")).text()
    assert count(after, "ok") - count(before, "ok") == 1
    assert count(after, "refused") - count(before, "refused") == 1
    info = f'flashgate_build_info{{python="{platform.python_version()}",version="{VERSION}"}} 1.0'
    assert info in after


def test_outcome_classes() -> None:
    assert [outcome_class(c) for c in ("ok", "queued", "replayed")] == ["ok"] * 3
    assert outcome_class("upstream-refused") == "upstream-refused"
    assert {outcome_class(c) for c in ("sold-out", "rate-limited", "bad-request")} == {"refused"}
    failed = ("internal", "upstream-failed", "upstream-timeout", "unavailable")
    assert {outcome_class(c) for c in failed} == {"failed"}
