"""The wheel carries the Lua scripts and works installed in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from gateway.embedded.server import EmbeddedRedis

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LUA = sorted(p.name for p in (ROOT / "lua").glob("*.lua"))

PROBE = """
import asyncio, sys
from pathlib import Path
import gateway, limiter
from limiter.scripts import Scripts, lua_dir
from limiter.guard import RedisGuard
from limiter.pipeline import AutoPipeline
from limiter.keys import CampaignKeys, new_reservation_id
from limiter.records import Attempt
from limiter.store import CampaignStore, StorePolicy

prefix = Path(sys.prefix).resolve()
for module in (gateway, limiter):
    assert prefix in Path(module.__file__).resolve().parents, module.__file__
assert prefix in lua_dir().resolve().parents, lua_dir()

async def main() -> None:
    async with AutoPipeline.opened(sys.argv[1], RedisGuard(2.0)) as pipe:
        store = CampaignStore(pipe, Scripts.read(), CampaignKeys("wheel"), StorePolicy(1, 0, 1000))
        await store.init(1)
        (decision,) = await store.reserve([Attempt(new_reservation_id("wheel"), "u", 1)])
        print(decision.status.name, (await store.figures()).available)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=120,
    )
    (built,) = out.glob("flashgate-*.whl")
    return built


def test_wheel_contains_every_script(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("limiter/lua/")) == LUA
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "flashgate = gateway.process.cli:main" in scripts


def test_wheel_works_in_a_fresh_virtualenv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=300)
    with EmbeddedRedis() as redis:
        probe = subprocess.run(
            [str(python), "-c", PROBE, redis.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["RESERVED", "0"]
    check = subprocess.run(
        [str(env_dir / "bin" / "flashgate"), "check", "-c", str(ROOT / "config" / "example.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"FLASHGATE_ADMIN_TOKEN": "x"},
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "valid" in check.stdout
