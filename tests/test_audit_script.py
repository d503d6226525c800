"""audit.lua: what the records say against the counters (reconcile's source).

Each scenario asserts the exact outcome and then ``check_invariant``, which reads Redis
directly. The rig and its helpers are in tests/scripts_rig.py.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from limiter.audit import audit
from limiter.records import Figures
from tests.helpers import redis_snapshot
from tests.scripts_rig import ACTOR, Rig, record, reserved

pytestmark = pytest.mark.integration


async def test_audit_reports_an_indexed_record_that_is_gone_and_repairs_nothing(
    rig: Rig, redis: Redis
) -> None:
    store = rig.store()
    await store.init(10)
    kept = await reserved(store, "alice")
    lost = await reserved(store, "bob")
    await redis.delete(store.keys.reservation(lost))  # deleted by hand
    found = await audit(store, repair=False, actor=ACTOR)
    assert (found.reserved_by_records, found.sold_by_records) == (1, 0)
    assert found.missing_records == 1
    assert found.drift  # the counters still count bob's unit: reconcile says so
    assert (await record(redis, store, kept))["state"] == "reserved"
    # a repair would believe the incomplete records and put bob's unit back on sale
    before = await redis_snapshot(redis)
    refused = await audit(store, repair=True, actor=ACTOR)
    assert refused.repair_refused
    assert refused.repaired is None
    assert await redis_snapshot(redis) == before
    assert await store.figures() == Figures(8, 2, 0, 10)
