"""Reservation ids: well-formed, never repeated, not even across a fork."""

from __future__ import annotations

import os

from limiter.keys import RESERVATION_ID, campaign_of, new_reservation_id


def test_reservation_ids_name_their_campaign_and_never_repeat() -> None:
    ids = [new_reservation_id("c-1") for _ in range(5000)]  # several refills of entropy
    assert len(set(ids)) == len(ids)
    assert all(RESERVATION_ID.match(rid) and campaign_of(rid) == "c-1" for rid in ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_reservation_id("c")  # the parent holds unused entropy when it forks
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(writing, " ".join(new_reservation_id("c") for _ in range(50)).encode())
        os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        in_child = set(pipe.read().split())
    os.waitpid(child, 0)
    in_parent = {new_reservation_id("c") for _ in range(50)}
    assert len(in_child) == 50
    assert not in_child & in_parent
