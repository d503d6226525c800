"""Loading the Lua scripts and registering them with a Redis client.

Each ``lua/<name>.lua`` gets ``lua/_prelude.lua`` (shared helpers) put in front of
it and is registered once as a redis-py ``Script`` (which knows its SHA1 and its
text). The auto-pipeline calls them by EVALSHA and loads them again when Redis
answers NOSCRIPT (after a restart, a failover or a SCRIPT FLUSH); see pipeline.py.

Redis numbers a failing script's lines from the prelude's first: ``explain`` turns
``user_script:150`` back into ``reserve.lua:37``.
"""

from __future__ import annotations

import hashlib
import re
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
def _prelude() -> str:
    return (lua_dir() / "_prelude.lua").read_text(encoding="utf-8")


#: Scripts by the SHA1 of their full text, for ``explain``.
_NAMES: dict[str, str] = {}


@cache
def source(name: str) -> str:
    """The full text of one script: the prelude, then the script itself."""
    body = (lua_dir() / f"{name}.lua").read_text(encoding="utf-8")
    text = f"{_prelude()}\n{body}"
    _NAMES[hashlib.sha1(text.encode()).hexdigest()] = name
    return text


_LINE = re.compile(r"user_script:(\d+)")
_SHA = re.compile(r"\b([0-9a-f]{40})\b")


def explain(message: str) -> str:
    """A Redis error about one of our scripts, its line numbers those of our files."""
    sha = _SHA.search(message)
    name = _NAMES.get(sha.group(1)) if sha else None
    if name is None:
        return message
    prelude_lines = _prelude().count("\n") + 1  # the prelude, then the newline joining them

    def local(match: re.Match[str]) -> str:
        line = int(match.group(1))
        if line <= prelude_lines:
            return f"_prelude.lua:{line}"
        return f"{name}.lua:{line - prelude_lines}"

    return _LINE.sub(local, message)


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
