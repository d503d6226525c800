"""The OpenAPI document of a configuration with waiting rooms: their paths, the pass a
purchase needs, the codes each call may answer; and it is valid OpenAPI 3.1."""

from __future__ import annotations

from pathlib import Path

from openapi_spec_validator import validate

from gateway.config import load_settings
from gateway.contract.openapi import document

CONFIG = Path(__file__).resolve().parent / "configs" / "good" / "waiting_room.yaml"


def test_the_document_has_the_waiting_rooms() -> None:
    doc = document(load_settings(CONFIG, environ={"FLASHGATE_ADMIN_TOKEN": "t"}))
    validate(doc)
    paths = doc["paths"]
    join, poll = paths["/queue/phone-1111"]["post"], paths["/queue/phone-1111"]["get"]
    assert "202" in join["responses"]
    assert "challenge-failed" in join["responses"]["403"]["description"]
    assert "ticket" in {p["name"] for p in poll["parameters"]}
    assert "ticket-invalid" in poll["responses"]["403"]["description"]
    assert "get" in paths["/queue/phone-1111/challenge"]
    assert "/queue/tv-42/challenge" not in paths  # that room asks no proof of work
    assert "get" in paths["/queue/tv-42/page"]
    buy = paths["/seckill/phone-1111"]["post"]
    assert "X-Queue-Pass" in {p["name"] for p in buy["parameters"]}
    assert "queue-pass-required" in buy["responses"]["403"]["description"]
    schemas = doc["components"]["schemas"]
    assert {"Challenge", "QueueJoin", "QueueState", "QueueJoined"} <= schemas.keys()
