"""Honest proxy headers: what a client says about the connection never reaches the backend
unless a trusted proxy said it; the gateway writes X-Forwarded-*, X-Real-IP, Forwarded
and Via itself. A 401 says how to authenticate; Server names no version."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Gateway, OpenGateway, Shop, problem_of

SPOOF = {
    "Forwarded": "for=6.6.6.6;proto=https;host=evil.example",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "X-Real-IP": "6.6.6.6",
}

#: (trusted proxies, what the client sent, what the backend must receive)
CASES: list[tuple[list[str], dict[str, str], dict[str, str]]] = [
    # nobody is trusted: every claim about the connection is dropped
    (
        [],
        SPOOF,
        {
            "X-Forwarded-For": "127.0.0.1",
            "X-Real-IP": "127.0.0.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "{host}",
            "Forwarded": 'for=127.0.0.1;proto=http;host="{host}"',
        },
    ),
    # the peer is a trusted balancer: the client is what it names, nothing to its left
    (
        ["127.0.0.1/32"],
        {
            "X-Forwarded-For": "6.6.6.6, 203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "shop.example",
            "X-Real-IP": "6.6.6.6",
            "Forwarded": "for=6.6.6.6",
        },
        {
            "X-Forwarded-For": "203.0.113.9, 127.0.0.1",
            "X-Real-IP": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "shop.example",
            "Forwarded": 'for=203.0.113.9;proto=https;host="shop.example", for=127.0.0.1',
        },
    ),
    # two trusted proxies in a row
    (
        ["127.0.0.1/32", "10.0.0.0/8"],
        {"X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.1.2.3"},
        {
            "X-Forwarded-For": "203.0.113.9, 10.1.2.3, 127.0.0.1",
            "X-Real-IP": "203.0.113.9",
            "Forwarded": 'for=203.0.113.9;proto=http;host="{host}", for=10.1.2.3, for=127.0.0.1',
        },
    ),
    # a garbled hop: nothing left of it is believed; nonsense proto and host are not taken
    (
        ["127.0.0.1/32"],
        {
            "X-Forwarded-For": "203.0.113.9, not-an-address",
            "X-Forwarded-Proto": "gopher",
            "X-Forwarded-Host": "a b",
        },
        {
            "X-Forwarded-For": "127.0.0.1",
            "X-Real-IP": "127.0.0.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "{host}",
        },
    ),
    # an IPv6 client behind the balancer: quoted and bracketed in Forwarded
    (
        ["127.0.0.1/32"],
        {"X-Forwarded-For": "2001:db8::7"},
        {
            "X-Forwarded-For": "2001:db8::7, 127.0.0.1",
            "Forwarded": 'for="[2001:db8::7]";proto=http;host="{host}", for=127.0.0.1',
        },
    ),
    # Via is extended, not replaced
    ([], {"Via": "1.0 corp-proxy"}, {"Via": "1.0 corp-proxy, 1.1 flashgate"}),
    ([], {}, {"Via": "1.1 flashgate"}),
]


@pytest.mark.usefixtures("redis")
@pytest.mark.parametrize(("trusted", "sent", "received"), CASES)
async def test_what_the_backend_receives(
    new_gateway: OpenGateway,
    settings_data: dict[str, Any],
    shop: Shop,
    trusted: list[str],
    sent: dict[str, str],
    received: dict[str, str],
) -> None:
    settings_data["gateway"]["trusted_proxies"] = trusted
    settings_data["campaigns"][0]["stock"] = 1000
    async with new_gateway() as gw:
        response = await gw.buy(f"buyer-{len(shop.seen)}-{id(sent)}", headers=sent)
        assert response.status == 201, await response.text()
        host = f"127.0.0.1:{gw.edge.server.port}"
    (seen,) = shop.seen
    for name, value in received.items():
        assert seen.headers.get(name) == value.format(host=host), name
    values = {k.lower(): v for k, v in seen.headers.items()}
    assert "6.6.6.6" not in " ".join(values.values())
    assert "evil.example" not in " ".join(values.values())


async def test_a_401_says_how_to_authenticate(gateway: Gateway) -> None:
    response = await gateway.buy(None)
    assert (await problem_of(response))["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"] == 'Header realm="flashgate", name="X-User-Id"'
    twice = await gateway.edge.post(
        "/seckill/phone-1111", headers=[("X-User-Id", "a"), ("X-User-Id", "b")]
    )
    assert twice.status == 401
    assert "WWW-Authenticate" in twice.headers


async def test_server_names_no_version(gateway: Gateway) -> None:
    answers = [
        await gateway.buy("alice"),
        await gateway.edge.get("/nowhere"),
        await gateway.edge.get("/healthz"),
        await gateway.admin.get("/healthz"),
        await gateway.admin.get("/campaigns"),
    ]
    assert {a.headers["Server"] for a in answers} == {"flashgate"}
