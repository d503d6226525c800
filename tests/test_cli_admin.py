"""``flashgate admin`` against a running gateway's admin API, ``status --watch``, the exit
codes in --help, Ctrl-C's 130, and JSON application logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from gateway.process import cli
from gateway.process.env import DENIED, FAILED, INTERRUPTED, INVALID, OK, UNAVAILABLE, JsonFormatter
from tests.helpers import Gateway, check_invariant, ledger


@pytest.fixture
def scoped_tokens(settings_data: dict[str, Any]) -> None:
    settings_data["admin"]["tokens"] = [
        {"name": "backend", "token": "backend-secret", "scopes": ["confirm"]}
    ]


def config_file(tmp_path: Path, settings_data: dict[str, Any], **admin: Any) -> Path:
    data = json.loads(json.dumps(settings_data))
    data["admin"].update(admin)
    path = tmp_path / "flashgate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def flashgate(
    gateway: Gateway, config: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    url = str(gateway.admin.make_url("")).rstrip("/")
    argv = ["admin", "-c", str(config), "--url", url, *args]
    code = await asyncio.to_thread(cli.main, argv)  # this loop serves the admin API meanwhile
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_stock_cancel_and_reload(
    gateway: Gateway, redis: Redis, tmp_path: Path, settings_data: dict[str, Any], capsys: Any
) -> None:
    config = config_file(tmp_path, settings_data)
    code, out, _ = await flashgate(gateway, config, capsys, "stock", "phone-1111", "--delta", "5")
    assert (code, out.strip()) == (
        OK,
        "phone-1111: available 15, reserved 0, sold 0, stock total 15",
    )
    code, out, _ = await flashgate(
        gateway, config, capsys, "--json", "stock", "phone-1111", "--set", "3"
    )
    assert code == OK
    assert json.loads(out)["available"] == 3
    code, _, err = await flashgate(gateway, config, capsys, "stock", "phone-1111", "--delta", "-9")
    assert code == FAILED
    assert "409 insufficient-stock" in err
    bought = await gateway.buy("alice")
    rid = bought.headers["X-Reservation-Id"]
    code, out, _ = await flashgate(gateway, config, capsys, "cancel", rid)
    assert (code, out.strip()) == (OK, f"{rid}: cancelled (cancelled now)")
    code, out, _ = await flashgate(gateway, config, capsys, "cancel", rid)
    assert out.strip() == f"{rid}: cancelled (already back in stock)"
    await check_invariant(redis, "phone-1111", 1)
    code, _, err = await flashgate(gateway, config, capsys, "reload")
    assert code == FAILED  # an in-process gateway was not started from a file
    assert "404 not-found" in err


@pytest.mark.usefixtures("scoped_tokens")
async def test_the_token_is_chosen_by_scope(
    gateway: Gateway, redis: Redis, tmp_path: Path, settings_data: dict[str, Any], capsys: Any
) -> None:
    # no admin.token: the backend's token, which may confirm but not set stock
    config = config_file(tmp_path, settings_data, token=None)
    code, _, err = await flashgate(gateway, config, capsys, "stock", "phone-1111", "--delta", "1")
    assert code == DENIED
    assert "'stock' scope" in err
    code, _, err = await flashgate(
        gateway, config, capsys, "--token-name", "backend", "stock", "phone-1111", "--delta", "1"
    )
    assert code == DENIED
    assert "403 forbidden" in err
    bought = await gateway.buy("alice")
    rid = bought.headers["X-Reservation-Id"]
    code, out, _ = await flashgate(gateway, config, capsys, "confirm", rid)
    assert (code, out.strip()) == (OK, f"{rid}: committed (was final already)")
    entries = await ledger(redis, "phone-1111")
    assert not [e for e in entries if e["op"] == "adjust"]


async def test_an_unreachable_gateway_is_exit_3(
    tmp_path: Path, settings_data: dict[str, Any], capsys: Any
) -> None:
    config = config_file(tmp_path, settings_data)
    code = cli.main(["admin", "-c", str(config), "--url", "http://127.0.0.1:9", "reload"])
    assert code == UNAVAILABLE
    assert "cannot reach the admin API" in capsys.readouterr().err
    assert cli.main(["admin", "-c", str(tmp_path / "missing.yaml"), "reload"]) == INVALID


async def test_dead_letters_list_and_replay_say_so(
    gateway: Gateway, tmp_path: Path, settings_data: dict[str, Any], capsys: Any
) -> None:
    config = config_file(tmp_path, settings_data)
    code, out, _ = await flashgate(gateway, config, capsys, "dead-letters", "list", "phone-1111")
    assert (code, out.strip()) == (OK, "phone-1111: no dead letters")
    code, out, _ = await flashgate(
        gateway, config, capsys, "dead-letters", "replay", "phone-1111", "1-0"
    )
    assert code == FAILED
    assert out.splitlines() == ["phone-1111: 0 replayed", "  1-0 not replayed: no such dead letter"]


def test_help_lists_the_exit_codes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, check=True
    )
    for line in ("exit codes:", "130  interrupted (Ctrl-C)", "4    the admin token may not"):
        assert line in result.stdout


@pytest.mark.e2e
def test_ctrl_c_exits_130(tmp_path: Path, settings_data: dict[str, Any], redis_server: Any) -> None:
    data = json.loads(json.dumps(settings_data))
    data["redis"] = {"url": redis_server.url}
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump(data))
    watching = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "status",
            "-c",
            str(path),
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watching.stdout is not None
    header = watching.stdout.readline()  # it runs: the first screen's header
    assert header.split()[:3] == ["time", "campaign", "available"]
    watching.stdout.readline()  # and a line of figures
    watching.send_signal(signal.SIGINT)
    _, err = watching.communicate(timeout=20)
    assert watching.returncode == INTERRUPTED, err


def test_watch_lines_show_what_sold_since() -> None:
    from gateway.operations.watch import line, render

    before = {"id": "c", "available": 10, "reserved": 0, "sold": 0, "balanced": True}
    after = {"id": "c", "available": 6, "reserved": 1, "sold": 3, "balanced": True}
    row = line(after, before, 2.0, 0.0)
    assert row[1:] == ["c", "6", "1", "3", "1.5", "ok"]
    assert render([row], header=True).splitlines()[0].split()[0] == "time"
    assert line({"id": "c", "balanced": None}, None, 1.0, 0.0)[2:] == ["-", "-", "-", "-", "-"]


def test_json_logs_are_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("flashgate.test-json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("campaign %s: %s", "c", 'a "quoted" thing')
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(x) for x in stream.getvalue().splitlines() if x.startswith("{"))
    assert (first["level"], first["message"]) == ("warning", 'campaign c: a "quoted" thing')
    assert first["logger"] == "flashgate.test-json"
    assert first["time"].endswith("Z")
    assert "ValueError: boom" in second["exception"]
