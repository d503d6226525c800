"""Real gateway processes for end-to-end tests: started, waited for, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from gateway.embedded.server import free_port


class GatewayProcess:
    """``flashgate run`` in a child process, on free ports, with its log in a file."""

    def __init__(self, config: dict[str, Any], workdir: Path, *extra_args: str) -> None:
        self.config = config
        self.workdir = workdir
        self.extra_args = extra_args
        self.port = config["gateway"]["port"] or free_port()
        self.admin_port = config["admin"]["port"] or free_port()
        config["gateway"]["port"] = self.port
        config["admin"]["port"] = self.admin_port
        self.config_path = workdir / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait: float = 20.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path), *self.extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited at start:\n{self.log()}")
            if _answers(f"{self.url}/readyz"):
                return self
            time.sleep(0.05)  # the poll interval of this bounded wait for readiness
        self.stop()
        raise AssertionError(f"gateway did not become ready within {wait}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, wait: float = 20.0) -> int:
        """Send ``sig`` and wait; returns the exit code."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None
        return process.returncode

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit on its own; returns the exit code."""
        assert self.process is not None
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
