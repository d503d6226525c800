"""RateLimit header fields (IETF httpapi draft, or X-RateLimit-* as APISIX and Kong send)
on a limited campaign's 429s and admitted answers, from the buckets' verdicts."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.admission.ratelimit_fields import Policy, RateLimitFields
from tests.helpers import AUTH, OpenGateway, problem_of

#: An sf-list of strings with integer parameters: '"a";r=1;t=2, "b";r=0;t=1'.
_ITEM = re.compile(r'"([a-z]+)"((?:;[a-z]+=\d+)+)')


def parse(field: str) -> dict[str, dict[str, int]]:
    items = {}
    for part in field.split(", "):
        match = _ITEM.fullmatch(part)
        assert match, f"{part!r} is not a structured-field item with parameters"
        params = dict(p.split("=") for p in match.group(2).lstrip(";").split(";"))
        items[match.group(1)] = {k: int(v) for k, v in params.items()}
    return items


def test_the_fields_of_a_token_bucket() -> None:
    fields = RateLimitFields("draft", [Policy("client", 10, 5.0), Policy("campaign", 100, 100.0)])
    admitted = fields.admitted([9, 40])
    assert parse(admitted["RateLimit-Policy"]) == {
        "client": {"q": 10, "w": 2},
        "campaign": {"q": 100, "w": 1},
    }
    assert parse(admitted["RateLimit"]) == {
        "client": {"r": 9, "t": 1},
        "campaign": {"r": 40, "t": 1},
    }
    refused = fields.refused(1, 3, [9, 0])
    assert parse(refused["RateLimit"])["campaign"] == {"r": 0, "t": 3}
    legacy = RateLimitFields("legacy", fields.policies).admitted([9, 40])
    assert legacy == {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "9",
        "X-RateLimit-Reset": "1",
    }
    assert not RateLimitFields("off", fields.policies).enabled
    assert not RateLimitFields("draft", []).enabled


@pytest.fixture
def limited(settings_data: dict[str, Any]) -> None:
    settings_data["campaigns"][0].update(
        {
            "stock": 100,
            "per_user_limit": 10,
            "client_rate_limit": {"key": "user", "rate": 2, "per": "1s", "burst": 2},
            "rate_limit": {"rate": 1000, "per": "1s", "burst": 1000},
        }
    )


@pytest.mark.usefixtures("redis", "limited")
async def test_admitted_answers_and_429s_carry_the_draft_fields(new_gateway: OpenGateway) -> None:
    async with new_gateway() as gw:
        first = await gw.buy("alice")
        second = await gw.buy("alice")
        third = await gw.buy("alice")
        problem = await problem_of(third)
    assert (first.status, second.status, third.status) == (201, 201, 429)
    policy = parse(first.headers["RateLimit-Policy"])
    assert policy == {"client": {"q": 2, "w": 1}, "campaign": {"q": 1000, "w": 1}}
    assert parse(first.headers["RateLimit"])["client"]["r"] == 1
    assert parse(second.headers["RateLimit"])["client"]["r"] == 0
    campaign_left = parse(second.headers["RateLimit"])["campaign"]["r"]
    assert 0 < campaign_left <= 1000
    assert problem["limit"] == "client_rate_limit"
    refused = parse(third.headers["RateLimit"])["client"]
    assert refused["r"] == 0
    assert refused["t"] >= 1
    assert third.headers["Retry-After"] in ("1", "2")


@pytest.mark.usefixtures("redis", "limited")
async def test_legacy_fields(new_gateway: OpenGateway, settings_data: dict[str, Any]) -> None:
    settings_data["gateway"]["ratelimit_headers"] = "legacy"
    async with new_gateway() as gw:
        answer = await gw.buy("alice")
    assert answer.status == 201
    assert (answer.headers["X-RateLimit-Limit"], answer.headers["X-RateLimit-Remaining"]) == (
        "2",
        "1",
    )
    assert int(answer.headers["X-RateLimit-Reset"]) >= 0
    assert "RateLimit" not in answer.headers


@pytest.mark.usefixtures("redis", "limited")
async def test_off_sends_none(new_gateway: OpenGateway, settings_data: dict[str, Any]) -> None:
    settings_data["gateway"]["ratelimit_headers"] = "off"
    async with new_gateway() as gw:
        answer = await gw.buy("alice")
    assert answer.status == 201
    assert not [h for h in answer.headers if "ratelimit" in h.lower()]


@pytest.mark.usefixtures("redis")
async def test_an_unlimited_campaign_and_a_sold_out_answer_carry_none(
    new_gateway: OpenGateway, settings_data: dict[str, Any]
) -> None:
    async with new_gateway() as gw:
        answer = await gw.buy("alice")
        assert answer.status == 201
        assert "RateLimit" not in answer.headers
    settings_data["campaigns"][0]["client_rate_limit"] = {"rate": 100, "per": "1s"}
    async with new_gateway() as gw:
        await gw.admin.post("/campaigns/phone-1111/stock", json={"set": 0}, headers=AUTH)
        await gw.buy("bob")  # Redis says sold out; the flag goes up
        local = await gw.buy("carol")
        assert local.status == 409
        assert "RateLimit" not in local.headers  # answered from memory, before any limit
