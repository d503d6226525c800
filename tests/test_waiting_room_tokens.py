"""Forged, expired, replayed and foreign tickets, passes and challenge solutions: each is
refused with its problem, and nothing in Redis changes (the gateway's background work,
which moves the room on its own, is stopped for the comparison)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
from redis.asyncio import Redis

from gateway.admission.queue_tokens import TICKET_LIFETIME_MS, QueueSigner, leading_zero_bits
from tests.helpers import Gateway, OpenGateway, problem_of, redis_snapshot, wait_for
from tests.waiting_room_helpers import QUEUE, QUEUE_KEYS, SECRET, Waiter, solve, with_room

pytestmark = pytest.mark.integration

CAMPAIGN = "phone-1111"
OTHER_SECRET = "another-secret-that-is-long-enough-000000"


def now_ms() -> int:
    return int(time.time() * 1000)


class Scene:
    """Alice waits; Bob holds a pass (admitted); Carol joined with ``carol_body``; the
    room's background is stopped."""

    def __init__(
        self, gateway: Gateway, alice: Waiter, bob: Waiter, bob_pass: str, carol_body: Any = None
    ) -> None:
        self.gateway = gateway
        self.alice = alice
        self.bob = bob
        self.bob_pass = bob_pass
        self.carol_body = carol_body
        self.signer = QueueSigner(SECRET, CAMPAIGN)


async def scene(
    new_gateway: OpenGateway, redis: Redis, run: Callable[[Scene], Awaitable[Any]]
) -> Any:
    async with new_gateway() as gw:
        bob, alice = Waiter(gw, "bob"), Waiter(gw, "alice")
        await bob.join_solving()
        admitted = await bob.wait_for_state("admitted")
        await alice.join_solving()
        gw.runtime.stop_background()
        await redis.delete(f"{QUEUE_KEYS}:view")  # shared for 100 ms: gone by itself soon
        before = await redis_snapshot(redis)
        result = await run(Scene(gw, alice, bob, admitted["pass"]))
        assert await redis_snapshot(redis) == before, "a refused request changed Redis"
        return result


def forged_ticket(ticket: str) -> str:
    body, _, signature = ticket.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["p"] = 1  # the very front
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "." + signature


TICKETS: dict[str, Callable[[Scene], str]] = {
    "forged place": lambda s: forged_ticket(s.alice.ticket),
    "signed with another secret": lambda s: QueueSigner(OTHER_SECRET, CAMPAIGN).ticket(
        "alice", 1, now_ms()
    ),
    "expired": lambda s: s.signer.ticket("alice", 1, now_ms() - TICKET_LIFETIME_MS - 1000),
    "another user's": lambda s: s.bob.ticket,
    "another campaign's": lambda s: QueueSigner(SECRET, "tv-42").ticket("alice", 1, now_ms()),
    "garbage": lambda s: "not-a-ticket",
    "signature cut": lambda s: s.alice.ticket.rsplit(".", 1)[0] + ".",
}


@pytest.mark.parametrize("case", TICKETS, ids=list(TICKETS))
async def test_a_bad_ticket_is_refused_and_changes_nothing(
    case: str, settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, proof_of_work={"difficulty": 4})

    async def run(s: Scene) -> None:
        status, problem = await s.alice.poll(TICKETS[case](s))
        assert (status, problem["code"]) == (403, "ticket-invalid"), problem

    await scene(new_gateway, redis, run)


def pass_with(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


AUDIENCE = f"flashgate:queue:{CAMPAIGN}"
PASSES: dict[str, Callable[[Scene], str]] = {
    "another user's": lambda s: s.bob_pass,
    "expired": lambda s: s.signer.issue_pass("alice", now_ms() - 1000),
    "another campaign's": lambda s: QueueSigner(SECRET, "tv-42").issue_pass(
        "alice", now_ms() + 60_000
    ),
    "signed with another secret": lambda s: pass_with(
        {"sub": "alice", "aud": AUDIENCE, "exp": now_ms() // 1000 + 60}, OTHER_SECRET
    ),
    "without an expiry": lambda s: pass_with({"sub": "alice", "aud": AUDIENCE}),
    "unsigned": lambda s: jwt.encode(
        {"sub": "alice", "aud": AUDIENCE, "exp": now_ms() // 1000 + 60}, "", algorithm="none"
    ),
    "garbage": lambda s: "not.a.pass",
    # well signed and unexpired, but Redis never gave alice a pass
    "never issued": lambda s: s.signer.issue_pass("alice", now_ms() + 60_000),
}


@pytest.mark.parametrize("case", PASSES, ids=list(PASSES))
async def test_a_bad_pass_is_refused_and_changes_nothing(
    case: str, settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, proof_of_work={"difficulty": 4})

    async def run(s: Scene) -> None:
        response = await s.gateway.buy("alice", headers={"X-Queue-Pass": PASSES[case](s)})
        assert response.status == 403
        assert (await problem_of(response))["code"] == "queue-pass-invalid"

    await scene(new_gateway, redis, run)


def unsolved(challenge: dict[str, Any]) -> str:
    """A nonce that does not solve the challenge."""
    nonce = 0
    while leading_zero_bits_of(challenge["salt"], nonce) >= challenge["difficulty"]:
        nonce += 1
    return str(nonce)


def leading_zero_bits_of(salt: str, nonce: int) -> int:
    return leading_zero_bits(hashlib.sha256(f"{salt}{nonce}".encode()).digest())


async def solved(s: Scene, user: str = "alice") -> dict[str, Any]:
    challenge = await Waiter(s.gateway, user).challenge()
    return {"challenge": challenge, "nonce": solve(challenge)}


SOLUTIONS: dict[str, Callable[[Scene], Awaitable[Any]]] = {}


def solution(name: str) -> Callable[[Callable[[Scene], Awaitable[Any]]], Any]:
    def register(make: Callable[[Scene], Awaitable[Any]]) -> Any:
        SOLUTIONS[name] = make
        return make

    return register


@solution("wrong nonce")
async def _wrong(s: Scene) -> Any:
    challenge = await Waiter(s.gateway, "carol").challenge()
    return {"challenge": challenge, "nonce": unsolved(challenge)}


@solution("another user's challenge")
async def _foreign(s: Scene) -> Any:
    return await solved(s, "dave")


@solution("forged difficulty")
async def _easier(s: Scene) -> Any:
    body = await solved(s, "carol")
    body["challenge"]["difficulty"] = 1
    body["nonce"] = solve(body["challenge"])
    return body


@solution("expired")
async def _expired(s: Scene) -> Any:
    challenge = s.signer.challenge("carol", 4, 1000, now_ms() - 120_000)
    return {"challenge": challenge, "nonce": solve(challenge)}


@solution("signed with another secret")
async def _other_secret(s: Scene) -> Any:
    challenge = QueueSigner(OTHER_SECRET, CAMPAIGN).challenge("carol", 4, 60_000, now_ms())
    return {"challenge": challenge, "nonce": solve(challenge)}


@solution("no nonce")
async def _no_nonce(s: Scene) -> Any:
    return {"challenge": await Waiter(s.gateway, "carol").challenge()}


@solution("no body")
async def _no_body(s: Scene) -> Any:
    return None


@solution("already used")
async def _used(s: Scene) -> Any:
    return s.carol_body  # her solution once more, after it let her in


@pytest.mark.parametrize("case", SOLUTIONS, ids=list(SOLUTIONS))
async def test_a_bad_solution_is_refused_and_changes_nothing(
    case: str, settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, proof_of_work={"difficulty": 4}, admit_rate=0.001)
    async with new_gateway() as gw:
        carol = Waiter(gw, "carol")
        challenge = await carol.challenge()
        body = {"challenge": challenge, "nonce": solve(challenge)}
        assert (await carol.join(body))[0] == 202
        gw.runtime.stop_background()
        await wait_for(lambda: _view_gone(redis))
        made = await SOLUTIONS[case](Scene(gw, carol, carol, "", body))
        before = await redis_snapshot(redis)
        status, problem = await carol.join(made)
        assert (status, problem["code"]) == (403, "challenge-failed"), problem
        assert await redis_snapshot(redis) == before, "a refused join changed Redis"


async def _view_gone(redis: Redis) -> bool:
    return not await redis.exists(f"{QUEUE_KEYS}:view")


async def test_a_good_solution_lets_one_in_once(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data, proof_of_work={"difficulty": 8}, admit_rate=0.001)
    async with new_gateway() as gw:
        carol = Waiter(gw, "carol")
        challenge = await carol.challenge()
        assert challenge.keys() == {"salt", "difficulty", "expires", "signature"}
        assert challenge["difficulty"] == 8
        body = {"challenge": challenge, "nonce": solve(challenge)}
        assert (await carol.join(body))[0] == 202
        assert await redis.zscore(f"{QUEUE_KEYS}:solved", challenge["salt"]) is not None
        status, problem = await carol.join(body)
        assert (status, problem["code"]) == (403, "challenge-failed")
        # a fresh solution: the same place again
        status, again = await carol.join_solving()
        assert (status, again["position"]) == (202, 1)


async def test_without_proof_of_work_there_is_no_challenge(
    settings_data: dict[str, Any], new_gateway: OpenGateway, redis: Redis
) -> None:
    with_room(settings_data)
    async with new_gateway() as gw:
        response = await gw.edge.get(f"{QUEUE}/challenge", headers={"X-User-Id": "alice"})
        assert response.status == 404
