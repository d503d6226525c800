"""Errors raised by the Redis side of flashgate."""

from __future__ import annotations


class LimiterError(Exception):
    """Base class of everything limiter raises."""


class StorageError(LimiterError):
    """Redis could not decide: unreachable, too slow, or it answered with an error.

    The gateway fails closed on it: nobody is admitted without a Redis decision.
    ``maybe_applied`` is False only when the command certainly never reached Redis
    (the circuit was open, no connection could be made): nothing needs undoing then.
    """

    def __init__(self, message: str, *, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class CampaignMissing(LimiterError):
    """A campaign's counters are not in Redis (never initialised, or Redis lost its data)."""

    def __init__(self, campaign_id: str) -> None:
        super().__init__(f"campaign {campaign_id!r} has no counters in Redis")
        self.campaign_id = campaign_id
