"""RateLimit header fields of a limited campaign's answers.

``draft`` (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy`` lists each
bucket as a quota ``q`` per window ``w`` seconds, and ``RateLimit`` says what is left
of it now (``r``) and in how many seconds it is whole again (``t``). ``legacy``: the
``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` that APISIX and Kong send, for the
tightest bucket. A token bucket of rate R per second holding B tokens when full is the
policy "B per B / R seconds": ``r`` never exceeds ``q``.

The policy text is built once per campaign; an answer costs one short string per bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

Style = Literal["draft", "legacy", "off"]


class Policy(NamedTuple):
    name: str
    #: tokens when full
    quota: int
    #: tokens per second
    rate: float

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.quota / self.rate))

    def reset(self, remaining: int) -> int:
        """Seconds until the bucket is full again, from ``remaining`` tokens."""
        return max(0, math.ceil((self.quota - remaining) / self.rate))


class RateLimitFields:
    def __init__(self, style: Style, policies: Sequence[Policy]) -> None:
        self.style = style
        self.policies = tuple(policies)
        self.enabled = style != "off" and bool(self.policies)
        self._policy = ", ".join(f'"{p.name}";q={p.quota};w={p.window}' for p in self.policies)

    def admitted(self, remaining: Sequence[int]) -> Mapping[str, str]:
        """The fields of an answer that every bucket let through, ``remaining`` tokens each."""
        left = [min(max(r, 0), p.quota) for p, r in zip(self.policies, remaining, strict=True)]
        return self._fields(left, [p.reset(r) for p, r in zip(self.policies, left, strict=True)])

    def refused(self, index: int, retry: int, remaining: Sequence[int]) -> Mapping[str, str]:
        """The fields of a 429 from bucket ``index``: nothing left there for ``retry`` s
        (the buckets after it were not asked: shown as they are when full)."""
        known = [*remaining, *(p.quota for p in self.policies[len(remaining) :])]
        left = [min(max(r, 0), p.quota) for p, r in zip(self.policies, known, strict=True)]
        left[index] = 0
        resets = [p.reset(r) for p, r in zip(self.policies, left, strict=True)]
        resets[index] = max(retry, resets[index])
        return self._fields(left, resets)

    def _fields(self, left: Sequence[int], resets: Sequence[int]) -> Mapping[str, str]:
        if self.style == "legacy":
            tightest = min(range(len(left)), key=left.__getitem__)
            return {
                "X-RateLimit-Limit": str(self.policies[tightest].quota),
                "X-RateLimit-Remaining": str(left[tightest]),
                "X-RateLimit-Reset": str(resets[tightest]),
            }
        state = ", ".join(
            f'"{p.name}";r={r};t={t}' for p, r, t in zip(self.policies, left, resets, strict=True)
        )
        return {"RateLimit-Policy": self._policy, "RateLimit": state}
