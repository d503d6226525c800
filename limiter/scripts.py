"""Loading the Lua scripts and registering them with a Redis client.

Each ``lua/<name>.lua`` gets ``lua/_prelude.lua`` (shared helpers) put in front of
it and is registered once as a redis-py ``Script``, which calls EVALSHA and falls
back to loading the script when Redis answers NOSCRIPT (after a restart, a
failover or a SCRIPT FLUSH), in pipelines too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_PACKAGE = Path(__file__).resolve().parent
#: Installed wheels carry the scripts inside the package; a source checkout has them beside it.
_LUA_DIRS = (_PACKAGE / "lua", _PACKAGE.parent / "lua")


def lua_dir() -> Path:
    for candidate in _LUA_DIRS:
        if (candidate / "_prelude.lua").is_file():
            return candidate
    raise FileNotFoundError(f"Lua scripts not found in {' or '.join(map(str, _LUA_DIRS))}")


@cache
def source(name: str) -> str:
    """The full text of one script: the prelude, then the script itself."""
    directory = lua_dir()
    prelude = (directory / "_prelude.lua").read_text(encoding="utf-8")
    body = (directory / f"{name}.lua").read_text(encoding="utf-8")
    return f"{prelude}\n{body}"


@dataclass(frozen=True, slots=True)
class Scripts:
    """The scripts, registered with one client."""

    reserve: AsyncScript
    release: AsyncScript
    commit: AsyncScript
    adjust_stock: AsyncScript
    init_campaign: AsyncScript
    due: AsyncScript
    take_tokens: AsyncScript
    take_client_tokens: AsyncScript
    heartbeat: AsyncScript
    delivery_slot: AsyncScript
    hand_over: AsyncScript
    audit: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        names = cls.__dataclass_fields__
        return cls(**{name: redis.register_script(source(name)) for name in names})

    async def load(self, redis: Redis) -> None:
        """Load every script now, so the first requests do not pay for it."""
        for name in self.__dataclass_fields__:
            await redis.script_load(getattr(self, name).script)
