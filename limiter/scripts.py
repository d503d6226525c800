"""The Lua scripts: their text and SHA1, read once from ``lua/``.

Each ``lua/<name>.lua`` gets ``lua/_prelude.lua`` (shared helpers) put in front of
it. The auto-pipeline calls a script by EVALSHA and loads it again where Redis
answers NOSCRIPT (after a restart, a failover or a SCRIPT FLUSH); see pipeline.py.

On a Redis Cluster the scripts announce sold-out and restock with SPUBLISH, so that
a notice travels only within the shard that owns the campaign (``sharded``); one
server and a Sentinel primary keep PUBLISH, which every Redis version has.

Redis numbers a failing script's lines from the prelude's first: ``explain`` turns
``user_script:150`` back into ``reserve.lua:37``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import NamedTuple

_PACKAGE = Path(__file__).resolve().parent
#: Installed wheels carry the scripts inside the package; a source checkout has them beside it.
_LUA_DIRS = (_PACKAGE / "lua", _PACKAGE.parent / "lua")
#: The prelude's line that names the publishing command.
_PUBLISH = "local PUBLISH = 'PUBLISH'"


def lua_dir() -> Path:
    for candidate in _LUA_DIRS:
        if (candidate / "_prelude.lua").is_file():
            return candidate
    raise FileNotFoundError(f"Lua scripts not found in {' or '.join(map(str, _LUA_DIRS))}")


class Script(NamedTuple):
    name: str
    text: str
    sha: str

    @classmethod
    def of(cls, name: str, text: str) -> Script:
        script = cls(name, text, hashlib.sha1(text.encode()).hexdigest())
        _NAMES[script.sha] = name
        return script


#: Scripts by the SHA1 of their full text, for ``explain``.
_NAMES: dict[str, str] = {}


@cache
def _prelude() -> str:
    return (lua_dir() / "_prelude.lua").read_text(encoding="utf-8")


@cache
def script(name: str) -> Script:
    """One script: the prelude, then the script itself."""
    body = (lua_dir() / f"{name}.lua").read_text(encoding="utf-8")
    return Script.of(name, f"{_prelude()}\n{body}")


@cache
def sharded(plain: Script) -> Script:
    """The same script announcing with SPUBLISH (a Redis Cluster, Redis 7 and newer)."""
    return Script.of(plain.name, plain.text.replace(_PUBLISH, "local PUBLISH = 'SPUBLISH'", 1))


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every script, by the name of its file."""

    reserve: Script
    release: Script
    commit: Script
    adjust_stock: Script
    init_campaign: Script
    due: Script
    take_tokens: Script
    take_client_tokens: Script
    heartbeat: Script
    delivery_slot: Script
    hand_over: Script
    transfer_out: Script
    transfer_in: Script
    transfer_done: Script
    replay_dead_letter: Script
    cart_open: Script
    cart_move: Script
    cart_settled: Script
    follow_ledger: Script
    audit_close: Script
    repair_counters: Script
    repair_quotas: Script
    queue_join: Script
    queue_tick: Script
    queue_touch: Script
    queue_pass_check: Script
    queue_pass_use: Script

    @classmethod
    def read(cls) -> Scripts:
        return cls(**{f.name: script(f.name) for f in fields(cls)})

    def all(self) -> list[Script]:
        return [getattr(self, f.name) for f in fields(self)]


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
