"""CORS for shops that sell from a browser: preflights answered on campaign routes and
/reservations/{id}, answers readable by an allowed origin; without gateway.cors,
today's behaviour (a preflight is 405)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Gateway, OpenGateway, problem_of

ORIGIN = "https://shop.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type, idempotency-key, x-user-id",
}


@pytest.fixture
def cors(settings_data: dict[str, Any]) -> None:
    settings_data["gateway"]["cors"] = {
        "allow_origins": [ORIGIN, "http://localhost:3000"],
        "allow_headers": ["X-Trace"],
        "max_age": "10m",
    }


async def test_without_cors_a_preflight_is_405(gateway: Gateway) -> None:
    response = await gateway.edge.options("/seckill/phone-1111", headers=PREFLIGHT)
    assert response.status == 405
    assert "Access-Control-Allow-Origin" not in response.headers
    bought = await gateway.buy("alice", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in bought.headers


@pytest.mark.usefixtures("cors")
async def test_a_preflight_on_a_campaign_route(gateway: Gateway) -> None:
    response = await gateway.edge.options("/seckill/phone-1111", headers=PREFLIGHT)
    assert response.status == 204
    h = response.headers
    assert h["Access-Control-Allow-Origin"] == ORIGIN
    assert h["Access-Control-Allow-Methods"] == "POST"
    allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "idempotency-key", "x-user-id", "x-trace"} <= allowed
    assert h["Access-Control-Max-Age"] == "600"
    assert "Origin" in h["Vary"]


@pytest.mark.usefixtures("cors")
async def test_a_preflight_on_a_buyer_reservation(gateway: Gateway) -> None:
    headers = {**PREFLIGHT, "Access-Control-Request-Method": "GET"}
    response = await gateway.edge.options("/reservations/phone-1111.abc", headers=headers)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD"


@pytest.mark.usefixtures("cors")
@pytest.mark.parametrize(
    "change",
    [
        {"Origin": "https://evil.example"},
        {"Access-Control-Request-Method": "DELETE"},
        {"Access-Control-Request-Headers": "x-not-allowed"},
    ],
)
async def test_a_preflight_that_is_not_allowed_is_403(
    gateway: Gateway, change: dict[str, str]
) -> None:
    response = await gateway.edge.options("/seckill/phone-1111", headers={**PREFLIGHT, **change})
    assert (await problem_of(response))["code"] == "forbidden"
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.usefixtures("cors")
async def test_answers_to_an_allowed_origin_are_readable(gateway: Gateway) -> None:
    bought = await gateway.buy("alice", headers={"Origin": ORIGIN})
    assert bought.status == 201
    assert bought.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = bought.headers["Access-Control-Expose-Headers"]
    assert {"X-Reservation-Id", "Retry-After"} <= {e.strip() for e in exposed.split(",")}
    refused = await gateway.buy("alice", headers={"Origin": ORIGIN})  # over the limit
    assert refused.status == 403
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = await gateway.buy("bob", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    assert other.headers["Vary"] == "Origin"
    plain = await gateway.buy("carol")
    assert "Access-Control-Allow-Origin" not in plain.headers
    health = await gateway.edge.get("/healthz", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in health.headers


@pytest.mark.usefixtures("redis")
async def test_any_origin(new_gateway: OpenGateway, settings_data: dict[str, Any]) -> None:
    settings_data["gateway"]["cors"] = {"allow_origins": ["*"]}
    async with new_gateway() as gw:
        response = await gw.edge.options("/seckill/phone-1111", headers=PREFLIGHT)
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        bought = await gw.buy("alice", headers={"Origin": "https://anyone.example"})
        assert bought.headers["Access-Control-Allow-Origin"] == "*"
