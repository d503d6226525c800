"""The architecture as a contract: the layers in pyproject.toml ([tool.importlinter])
hold for every import, function-level and TYPE_CHECKING ones included, and serving
does not load what only the bench needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold() -> None:
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_serving_does_not_load_the_bench_or_the_demo() -> None:
    probe = (
        "import sys; from gateway.process import cli, serve, supervisor; "
        "print(sorted(m for m in sys.modules if m.startswith(('gateway.bench.', "
        "'gateway.process.demo'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert loaded == "[]"
