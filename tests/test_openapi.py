"""The OpenAPI document: generated from the code (routes, scopes, problem codes), valid
OpenAPI 3.1 (openapi-spec-validator), served at GET /openapi.json as `flashgate openapi`
prints it; and a live gateway fuzzed by Schemathesis against it, after which the books
balance. The README's problem table is the code's."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate
from redis.asyncio import Redis

from gateway.config import load_settings
from gateway.contract.openapi import document
from gateway.operations.admin import ROUTES
from gateway.problems import STATUS, Code
from tests.helpers import Shop, check_invariant, wait_for
from tests.processes import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs" / "good"
CONTRACT = CONFIGS / "contract.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_document_of_every_good_config_is_valid_openapi(path: Path) -> None:
    doc = document(load_settings(path, environ={"FLASHGATE_ADMIN_TOKEN": "t"}))
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert doc["openapi"] == "3.1.0"


def test_the_document_is_the_code() -> None:
    settings = load_settings(CONTRACT, environ={})
    doc = document(settings)
    schema = doc["components"]["schemas"]["Problem"]
    assert schema["properties"]["code"]["enum"] == [c.value for c in Code]
    for campaign in settings.campaigns:
        operation = doc["paths"][campaign.route.path][campaign.route.method.lower()]
        key = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
        assert key["required"] is campaign.require_idempotency_key
        quantity = operation["requestBody"]["content"]["application/json"]["schema"]
        assert quantity["properties"]["quantity"]["maximum"] == campaign.max_quantity
        assert ("202" in operation["responses"]) is (campaign.forward == "queue")
        for status in ("400", "401", "409", "422", "429", "503"):
            assert status in operation["responses"], status
    for route in ROUTES:
        operation = doc["paths"][route.path][route.method.lower()]
        scopes = [s for requirement in operation["security"] for s in requirement.values()]
        assert scopes == ([[route.scope]] if route.scope else []), route.path
        for code in route.codes:
            assert str(STATUS[code][0]) in operation["responses"], (route.path, code)
    headers = doc["webhooks"]["order"]["post"]["parameters"]
    assert {"X-Reservation-Id", "X-Delivery-Attempt", "Via"} <= {h["name"] for h in headers}
    assert doc["paths"]["/reservations/{id}"]["get"]["responses"]["200"]


def test_the_readme_table_is_the_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| `([a-z-]+)` \| (\d{3}) \|", readme, re.M))
    expected = {code.value: str(status) for code, (status, _) in STATUS.items()}
    assert table == expected


@pytest.fixture
def contract_gateway(
    run_gateway: Callable[..., GatewayProcess],
    redis: Redis,
    redis_server: Any,
    shop: Shop,
    monkeypatch: pytest.MonkeyPatch,
) -> GatewayProcess:
    monkeypatch.setenv("CONTRACT_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CONTRACT_SHOP_URL", shop.url)
    for name in ("FLASHGATE_ADMIN_TOKEN", "CONTRACT_BACKEND_TOKEN", "CONTRACT_VIEWER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = yaml.safe_load(CONTRACT.read_text(encoding="utf-8"))
    return run_gateway(config, "--workers", "1")


@pytest.mark.e2e
@pytest.mark.integration
def test_the_served_document_is_the_printed_one(contract_gateway: GatewayProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{contract_gateway.admin_url}/openapi.json", timeout=10) as r:
        served = json.load(r)
    printed = subprocess.run(
        [sys.executable, "-m", "gateway", "openapi", "-c", str(contract_gateway.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(printed.stdout) == served


CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


async def schemathesis(
    gateway: GatewayProcess, base: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """A bounded Schemathesis run (in a thread: this loop serves the shop meanwhile)."""
    st = Path(sys.executable).parent / "st"
    return await asyncio.to_thread(
        subprocess.run,
        [
            str(st),
            "run",
            f"{gateway.admin_url}/openapi.json",
            "--url",
            base,
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--seed",
            "16",
            "--request-timeout",
            "10",
            "--max-time",
            "60",
            "--workers",
            "1",
            "--suppress-health-check",
            "all",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=gateway.workdir,
    )


@pytest.mark.e2e
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_schemathesis_finds_nothing_and_the_books_balance(
    contract_gateway: GatewayProcess, redis: Redis
) -> None:
    buyers = await schemathesis(contract_gateway, contract_gateway.url, "--include-tag", "buyers")
    assert buyers.returncode == 0, buyers.stdout[-6000:] + buyers.stderr[-2000:]
    admin = await schemathesis(
        contract_gateway,
        contract_gateway.admin_url,
        "--include-tag",
        "admin",
        "--header",
        "Authorization: Bearer contract-admin-token",
    )
    assert admin.returncode == 0, admin.stdout[-6000:] + admin.stderr[-2000:]
    for campaign, limit in (("phone-1111", 2), ("tv-42", 3)):

        async def settled(campaign: str = campaign) -> bool:  # queued orders delivered
            return int(await redis.hget(f"fg:{{{campaign}}}:state", "reserved") or 0) == 0

        await wait_for(settled, within=30.0)
        state = await check_invariant(redis, campaign, limit)
        assert state["sold"] > 0, f"the fuzzer bought nothing from {campaign}"


def test_the_guides_cover_the_contract() -> None:
    """docs/backend.md names every header the order webhook lists; docs/clients.md every
    code a purchase may be answered."""
    from gateway.contract.openapi import ORDER_HEADERS, PURCHASE_CODES

    backend = (ROOT / "docs" / "backend.md").read_text(encoding="utf-8")
    clients = (ROOT / "docs" / "clients.md").read_text(encoding="utf-8")
    assert [h for h in ORDER_HEADERS if f"`{h}`" not in backend] == []
    missing = [c.value for c in PURCHASE_CODES if c.value not in clients]
    assert missing == []
