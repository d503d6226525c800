"""Helpers for the waiting-room tests: a room in the settings, a waiter's calls through
the gateway's HTTP API, a solver of challenges, Redis's own view of the queue."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio import Redis

from tests.helpers import Gateway, wait_for

SECRET = "waiting-room-secret-for-the-tests-0123456789"
QUEUE = "/queue/phone-1111"
QUEUE_KEYS = "fg:{phone-1111}:q"


def with_room(settings_data: dict[str, Any], **room: Any) -> dict[str, Any]:
    """``settings_data`` with a waiting room on its campaign (fast defaults for tests)."""
    settings: dict[str, Any] = {"admit_rate": 50, "secret": SECRET, **room}
    settings_data["campaigns"][0]["waiting_room"] = settings
    return settings_data


def solve(challenge: dict[str, Any]) -> str:
    """The first nonce whose SHA-256(salt + nonce) has the leading zero bits asked."""
    salt, difficulty = challenge["salt"], challenge["difficulty"]
    nonce = 0
    while True:
        digest = int.from_bytes(hashlib.sha256(f"{salt}{nonce}".encode()).digest(), "big")
        if digest >> (256 - difficulty) == 0:
            return str(nonce)
        nonce += 1


class Waiter:
    """One user's calls to the waiting room and the shop, through a gateway."""

    def __init__(self, gateway: Gateway, user: str) -> None:
        self.gateway = gateway
        self.user = user
        self.ticket = ""
        self.last: dict[str, Any] = {}

    @property
    def headers(self) -> dict[str, str]:
        return {"X-User-Id": self.user}

    async def challenge(self) -> dict[str, Any]:
        response = await self.gateway.edge.get(f"{QUEUE}/challenge", headers=self.headers)
        assert response.status == 200, await response.text()
        document: dict[str, Any] = await response.json()
        return document

    async def join(self, body: Any = None) -> tuple[int, dict[str, Any]]:
        response = await self.gateway.edge.post(QUEUE, headers=self.headers, json=body)
        document: dict[str, Any] = await response.json(content_type=None)
        if response.status == 202:
            self.ticket = document["ticket"]
            self.last = document
        return response.status, document

    async def join_solving(self) -> tuple[int, dict[str, Any]]:
        challenge = await self.challenge()
        return await self.join({"challenge": challenge, "nonce": solve(challenge)})

    async def poll(self, ticket: str | None = None) -> tuple[int, dict[str, Any]]:
        response = await self.gateway.edge.get(
            QUEUE, params={"ticket": ticket or self.ticket}, headers=self.headers
        )
        document: dict[str, Any] = await response.json(content_type=None)
        if response.status == 200:
            self.last = document
        return response.status, document

    async def state(self) -> str:
        status, document = await self.poll()
        assert status == 200, document
        return str(document["state"])

    async def wait_for_state(self, *states: str, within: float = 10.0) -> dict[str, Any]:
        async def reached() -> bool:
            return await self.state() in states

        await wait_for(reached, within)
        return self.last

    async def buy(self, pass_token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if pass_token is not None:
            headers["X-Queue-Pass"] = pass_token
        response = await self.gateway.buy(self.user, headers=headers, **kwargs)
        return response.status, await response.json(content_type=None)


async def queue_figures(redis: Redis) -> dict[str, int]:
    """Redis's own account of the queue, read without the code under test."""
    line, passes, used = await asyncio.gather(
        redis.zcard(f"{QUEUE_KEYS}:line"),
        redis.zcard(f"{QUEUE_KEYS}:passes"),
        redis.zcard(f"{QUEUE_KEYS}:used"),
    )
    return {"waiting": int(line), "passes": int(passes), "used": int(used)}
