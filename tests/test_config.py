"""The configuration loader: one broken file per failure mode, ``${VAR}`` expansion,
durations, several problems at once, and ``flashgate check`` / ``run`` on bad files.

Every file in ``tests/configs/bad`` starts with ``# expect: <field path> | <reason>``
(``-`` as the path for a problem of the whole file, such as invalid YAML).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import ConfigError, Route, Settings, load_settings, parse_settings
from gateway.config.redis_url import parse_redis_url
from gateway.config.schema import Invalid
from gateway.config.values import duration
from gateway.process import cli
from gateway.process.env import INVALID

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
BAD = sorted((CONFIGS / "bad").glob("*.yaml"))
GOOD = sorted((CONFIGS / "good").glob("*.yaml"))
UNSET = "FLASHGATE_TEST_SURELY_UNSET_VAR"
ENV = {"FLASHGATE_ADMIN_TOKEN": "env-admin-token"}
#: Generous for a process that only parses a file, short enough that a bug that
#: starts a server instead of refusing the file fails the test instead of hanging it.
CLI_TIMEOUT = 20.0

#: Failure modes the bad directory must keep covering (file stems).
REQUIRED_MODES = frozenset(
    {
        "yaml_syntax",
        "duplicate_key",
        "top_level_list",
        "unknown_top_field",
        "unknown_nested_field",
        "campaign_missing_id",
        "campaign_missing_route",
        "campaign_missing_upstream",
        "campaign_missing_stock",
        "stock_negative",
        "stock_not_integer",
        "stock_float",
        "per_user_limit_zero",
        "campaign_id_chars",
        "route_bad_method",
        "route_no_leading_slash",
        "route_with_query",
        "route_reserved_healthz",
        "duplicate_campaign_id",
        "duplicate_route",
        "upstream_not_defined",
        "upstream_url_scheme",
        "redis_url_scheme",
        "redis_sentinel_without_service",
        "redis_cluster_without_nodes",
        "redis_cluster_empty_node",
        "redis_cluster_with_db",
        "redis_sentinel_password_without_sentinel",
        "redis_timeout_word",
        "redis_timeout_zero",
        "upstream_timeout_negative",
        "gateway_port_too_big",
        "admin_token_empty",
        "admin_token_whitespace",
        "admin_without_token",
        "forward_mode",
        "forward_deadline_not_longer",
        "identity_header_space",
        "ledger_max_length_small",
        "campaigns_not_list",
        "upstreams_not_mapping",
        "env_var_unset",
    }
)

#: A valid file to append broken sections to.
BASE = """\
upstreams:
  shop: {url: "http://127.0.0.1:8000"}
campaigns:
  - id: phone-1111
    route: POST /seckill/phone-1111
    upstream: shop
    stock: 10
"""


@dataclass(frozen=True, slots=True)
class Expect:
    path: str
    reason: str


def expectation(file: Path) -> Expect:
    first = file.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{file.name}: no '# expect: PATH | REASON' line"
    path, separator, reason = first.removeprefix("# expect: ").partition(" | ")
    assert separator, f"{file.name}: the expect line needs ' | ' between path and reason"
    assert path.strip(), f"{file.name}: empty path (use - for the whole file)"
    assert reason.strip(), f"{file.name}: empty reason"
    return Expect("" if path.strip() == "-" else path.strip(), reason.strip())


def config_error(file: Path, environ: Mapping[str, str] = ENV) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(file, environ=environ)
    return info.value


def parse_error(text: str, environ: Mapping[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "inline.yaml", {} if environ is None else environ)
    return info.value


def expanded(value: str, environ: Mapping[str, str] | None) -> str:
    """What ``gateway.host`` (a string of any shape) becomes when the file says ``value``."""
    settings = parse_settings(f"gateway: {{host: '{value}'}}\n", "inline.yaml", environ)
    return settings.gateway.host


# --- one broken file per failure mode ------------------------------------------------


def test_bad_directory_covers_every_failure_mode() -> None:
    missing = REQUIRED_MODES - {file.stem for file in BAD}
    assert not missing, f"tests/configs/bad lacks {sorted(missing)}"


@pytest.mark.parametrize("file", BAD, ids=[file.stem for file in BAD])
def test_bad_file_is_refused_naming_field_and_reason(file: Path) -> None:
    expect = expectation(file)
    error = config_error(file)

    assert error.source == str(file)
    assert (expect.path, expect.reason) in [
        (path, expect.reason) for path, reason in error.problems if expect.reason in reason
    ], f"expected {expect} among {error.problems}"
    assert len(error.problems) == 1, f"one failure mode per file, got {error.problems}"

    lines = error.lines()
    assert len(lines) == len(error.problems)
    assert all(line.startswith(f"{file}: ") for line in lines), lines
    shown = f"{file}: {expect.path}: " if expect.path else f"{file}: "
    assert any(line.startswith(shown) and expect.reason in line for line in lines), lines
    assert str(error) == "\n".join(lines)


@pytest.mark.parametrize("file", BAD, ids=[file.stem for file in BAD])
def test_check_json_reports_each_bad_file(
    file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    expect = expectation(file)

    code = cli.main(["check", "-c", str(file), "--json"])

    out = capsys.readouterr().out
    assert code == INVALID == 2
    document = json.loads(out)
    assert document["file"] == str(file)
    assert document["valid"] is False
    assert [p for p in document["problems"] if p["path"] == expect.path], document
    assert any(expect.reason in p["reason"] for p in document["problems"]), document


# --- valid files ---------------------------------------------------------------------


@pytest.mark.parametrize("file", GOOD, ids=[file.stem for file in GOOD])
def test_good_file_loads(file: Path) -> None:
    settings = load_settings(file, environ=ENV)

    assert isinstance(settings, Settings)
    assert settings.campaigns
    assert all(c.upstream in settings.upstreams for c in settings.campaigns)


def test_good_directory_is_not_empty() -> None:
    assert {file.stem for file in GOOD} >= {"example", "minimal"}


def test_example_file_values() -> None:
    settings = load_settings(CONFIGS / "good" / "example.yaml", environ=ENV)

    assert settings.admin is not None
    assert settings.admin.token == "env-admin-token"
    assert (settings.admin.host, settings.admin.port) == ("127.0.0.1", 9090)
    assert (settings.gateway.host, settings.gateway.port) == ("127.0.0.1", 8080)
    assert settings.redis.embedded
    assert settings.redis.timeout == pytest.approx(0.25)
    assert settings.identity.header == "X-User-Id"
    assert settings.upstreams["shop"].url == "http://127.0.0.1:8000"
    assert settings.upstreams["shop"].timeout == pytest.approx(2.0)
    (campaign,) = settings.campaigns
    assert campaign.id == "phone-1111"
    assert campaign.route == Route("POST", "/seckill/phone-1111")
    assert (campaign.stock, campaign.per_user_limit, campaign.max_quantity) == (1000, 1, 1)
    assert campaign.forward == "sync"
    assert settings.campaign("phone-1111") is campaign
    assert settings.campaign("nope") is None


def test_shipped_example_matches_the_test_copy() -> None:
    shipped = load_settings(ROOT / "config" / "example.yaml", environ=ENV)
    assert shipped == load_settings(CONFIGS / "good" / "example.yaml", environ=ENV)


def test_minimal_file_gets_the_defaults() -> None:
    settings = load_settings(CONFIGS / "good" / "minimal.yaml", environ={})

    assert settings.admin is None
    assert settings.redis.url is None
    assert settings.redis.timeout == pytest.approx(0.25)
    assert settings.redis.key_prefix == "fg"
    assert settings.gateway.port == 8080
    assert settings.identity.header == "X-User-Id"
    assert settings.ledger.max_length == 100_000
    assert settings.upstreams["shop"].timeout == pytest.approx(2.0)
    (campaign,) = settings.campaigns
    assert campaign.stock == 0
    assert (campaign.per_user_limit, campaign.max_quantity) == (1, 1)
    assert campaign.forward == "sync"
    assert campaign.forward_deadline == pytest.approx(30.0)


def test_file_with_every_section_and_env_defaults() -> None:
    settings = load_settings(CONFIGS / "good" / "queue.yaml", environ={})

    assert settings.redis.url == "redis://127.0.0.1:6379/3"
    assert settings.redis.timeout == pytest.approx(60.0)
    assert (settings.redis.max_connections, settings.redis.key_prefix) == (32, "fg.test")
    assert settings.admin is not None
    assert settings.admin.token == "s3cret$"
    assert settings.gateway.max_body_bytes == 1024
    assert settings.identity.header == "X-Buyer"
    assert settings.ledger.max_length == 100
    assert settings.upstreams["shop"].url == "https://shop.example:8443/orders"
    assert settings.upstreams["shop"].timeout == pytest.approx(1.5)
    assert settings.upstreams["warehouse"].timeout == pytest.approx(3.0)
    first, second = settings.campaigns
    assert first.route == Route("POST", "/seckill/phone-1111")
    assert (first.forward, first.forward_deadline, first.stock) == ("queue", 2.0, 10**12)
    assert second.route == Route("PUT", "/seckill/phone-1111")
    assert second.forward_deadline == pytest.approx(3600.0)

    overridden = load_settings(
        CONFIGS / "good" / "queue.yaml",
        environ={"FLASHGATE_TEST_REDIS_URL": "rediss://cache:6380/0", "FLASHGATE_TEST_TOKEN": "t"},
    )
    assert overridden.redis.url == "rediss://cache:6380/0"
    assert overridden.admin is not None
    assert overridden.admin.token == "t$"


# --- ${VAR} expansion ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${T}", {"T": "abc"}, "abc"),
        ("x-${T}-${U}-y", {"T": "1", "U": "2"}, "x-1-2-y"),
        ("${T:-fallback}", {}, "fallback"),
        ("${T:-fallback}", {"T": "from-env"}, "from-env"),
        ("${T:-}x", {}, "x"),
        ("pa$$word", {}, "pa$word"),
        ("$${T}", {"T": "abc"}, "${T}"),
        ("$$$${T}", {"T": "abc"}, "$${T}"),
        ("$$${T}", {"T": "abc"}, "$abc"),
        ("cost-$5", {}, "cost-$5"),
        ("${T}", {"T": "${U}"}, "${U}"),
        ("${T}", {"T": '": x'}, '": x'),
        ("${T}", {"T": "[1, 2]"}, "[1, 2]"),
        ("${T}", {"T": "123"}, "123"),
        ("${T}", {"T": "true"}, "true"),
        ("${T}", {"T": "{a:b}\n- c"}, "{a:b}\n- c"),
    ],
)
def test_expansion(value: str, environ: dict[str, str], expected: str) -> None:
    assert expanded(value, environ) == expected


def test_env_text_is_read_as_a_number_or_boolean_only_where_the_field_wants_one() -> None:
    text = (
        BASE.replace("stock: 10", "stock: ${STOCK}")
        + "access_log: {enabled: '${LOG}'}\n"
        + "admin: {token: '${TOKEN}'}\n"
    )
    settings = parse_settings(text, "inline.yaml", {"STOCK": " 5 ", "LOG": "False", "TOKEN": "007"})
    assert settings.campaigns[0].stock == 5
    assert settings.access_log.enabled is False
    assert settings.admin is not None
    assert settings.admin.token == "007"  # a string field keeps the text
    # never parsed as YAML: text that does not spell the field's type is refused as text
    for stock, shown in (("5x", "'5x'"), ("[5]", "'[5]'"), ("5.0", "'5.0'"), ("yes", "'yes'")):
        error = parse_error(BASE.replace("stock: 10", "stock: ${STOCK}"), {"STOCK": stock})
        assert error.problems == [("campaigns[0].stock", f"must be an integer, got str {shown}")]


def test_expansion_reaches_lists_and_nested_mappings() -> None:
    text = BASE.replace("upstream: shop", "upstream: ${UP}").replace(
        '"http://127.0.0.1:8000"', '"http://${HOST:-127.0.0.1}:${PORT}"'
    )
    settings = parse_settings(text, "inline.yaml", {"UP": "shop", "PORT": "9000"})
    assert settings.campaigns[0].upstream == "shop"
    assert settings.upstreams["shop"].url == "http://127.0.0.1:9000"


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHGATE_TEST_FROM_OS", "from-os")
    assert expanded("${FLASHGATE_TEST_FROM_OS}", None) == "from-os"


def test_explicit_environ_replaces_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLASHGATE_TEST_FROM_OS", "from-os")
    error = parse_error("gateway: {host: '${FLASHGATE_TEST_FROM_OS}'}\n", {})
    assert error.problems == [
        ("gateway.host", "environment variable FLASHGATE_TEST_FROM_OS is not set")
    ]


def test_every_unset_variable_is_reported_with_its_path() -> None:
    text = (
        BASE.replace("upstream: shop", f"upstream: ${{{UNSET}}}")
        + f"admin: {{token: '${{{UNSET}_B}}'}}\n"
        + f"redis: {{url: '${{{UNSET}_C}}/0'}}\n"
    )
    error = parse_error(text)
    assert sorted(error.problems) == sorted(
        [
            ("campaigns[0].upstream", f"environment variable {UNSET} is not set"),
            ("admin.token", f"environment variable {UNSET}_B is not set"),
            ("redis.url", f"environment variable {UNSET}_C is not set"),
        ]
    )


def test_example_without_its_token_names_the_variable() -> None:
    error = config_error(CONFIGS / "good" / "example.yaml", environ={})
    assert error.problems == [
        ("admin.token", "environment variable FLASHGATE_ADMIN_TOKEN is not set")
    ]
    assert error.lines() == [
        f"{CONFIGS / 'good' / 'example.yaml'}: admin.token: "
        "environment variable FLASHGATE_ADMIN_TOKEN is not set"
    ]


# --- durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        (3, 3.0),
        (0.5, 0.5),
        ("1.5s", 1.5),
        ("10", 10.0),
        (" 2 s ", 2.0),
        ("1500ms", 1.5),
    ],
)
def test_duration_in_seconds(raw: str | float, seconds: float) -> None:
    assert duration(raw) == pytest.approx(seconds)
    assert isinstance(duration(raw), float)
    settings = parse_settings(f"redis: {{timeout: {json.dumps(raw)}}}\n", "inline.yaml", {})
    assert settings.redis.timeout == pytest.approx(seconds)


@pytest.mark.parametrize(
    "raw", ["fast", "-1s", "2 S", "1d", "1e3s", "ms", "", "1 2s", True, None, [1], {"s": 1}]
)
def test_duration_refuses_what_is_not_a_duration(raw: object) -> None:
    with pytest.raises(Invalid, match="must be a duration like 500ms, 2s, 5m"):
        duration(raw)


@pytest.mark.parametrize("raw", [0, 0.0, -1, -0.5, "0", "0ms", "0.0s"])
def test_duration_refuses_what_is_not_positive(raw: object) -> None:
    with pytest.raises(Invalid, match="must be a positive duration"):
        duration(raw)


# --- several problems at once, and how they are shown ---------------------------------


def test_every_schema_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    file = tmp_path / "many.yaml"
    file.write_text(
        """\
listen: 8080
redis: {url: "http://127.0.0.1:6379", timeout: fast}
gateway: {port: 70000}
admin: {port: 9090}
identity: {header: "X User"}
ledger: {max_length: 10}
upstreams:
  shop: {url: "ftp://shop", timeout: -1}
campaigns:
  - id: "phone 1111"
    route: FETCH /seckill
    upstream: shop
    stock: -5
    per_user_limit: 0
    forward: later
  - route: POST /healthz
    upstream: shop
    stock: 1.5
    stok: 2
""",
        encoding="utf-8",
    )
    error = config_error(file)

    expected = {
        "listen": "unknown field",
        "redis.url": "must be a redis://",
        "redis.timeout": "must be a duration",
        "gateway.port": "must be <= 65535",
        "admin.token": "is required",
        "identity.header": "does not match",
        "ledger.max_length": "must be >= 100",
        "upstreams.shop.url": "must be an http:// or https:// URL",
        "upstreams.shop.timeout": "must be a positive duration",
        "campaigns[0].id": "does not match",
        "campaigns[0].route": "method must be one of",
        "campaigns[0].stock": "must be >= 0",
        "campaigns[0].per_user_limit": "must be >= 1",
        "campaigns[0].forward": "must be one of sync, queue",
        "campaigns[1].id": "is required",
        "campaigns[1].route": "is reserved",
        "campaigns[1].stock": "must be an integer, got float 1.5",
        "campaigns[1].stok": "did you mean 'stock'?",
    }
    assert {path for path, _ in error.problems} == set(expected)
    assert len(error.problems) == len(expected)
    for path, reason in error.problems:
        assert expected[path] in reason, (path, reason)
    assert len(error.lines()) == len(expected)
    assert all(line.startswith(f"{file}: ") for line in error.lines())


def test_every_relation_problem_is_reported() -> None:
    text = """\
gateway: {port: 8080}
admin: {token: t, port: 8080}
upstreams:
  shop: {url: "http://127.0.0.1:8000", timeout: 3s}
campaigns:
  - {id: a, route: POST /a, upstream: shop, stock: 1, forward_deadline: 3s}
  - {id: a, route: POST /b, upstream: warehouse, stock: 1}
  - {id: c, route: POST /a, upstream: shop, stock: 1, per_user_limit: 1, max_quantity: 2}
"""
    error = parse_error(text)
    assert sorted(error.problems) == sorted(
        [
            ("campaigns[0].forward_deadline", "must be longer than upstream 'shop''s timeout (3s)"),
            ("campaigns[1].id", "'a' is already used by campaigns[0]"),
            ("campaigns[1].upstream", "no upstream named 'warehouse' (known: shop)"),
            ("campaigns[2].route", "'POST /a' is already used by campaigns[0]"),
            ("admin.port", "must differ from gateway.port on the same host"),
        ]
    )


def test_lines_prefix_the_source_and_skip_an_empty_path() -> None:
    error = ConfigError("f.yaml", [("a.b", "is wrong"), ("", "invalid YAML: x")])
    assert error.lines() == ["f.yaml: a.b: is wrong", "f.yaml: invalid YAML: x"]
    assert str(error) == "f.yaml: a.b: is wrong\nf.yaml: invalid YAML: x"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "absent.yaml"
    error = config_error(file)
    assert error.problems == [("", "cannot read: No such file or directory")]
    assert error.lines() == [f"{file}: cannot read: No such file or directory"]


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(tmp_path)
    assert error.problems == [("", "cannot read: Is a directory")]


def test_yaml_error_names_the_line_of_the_duplicate() -> None:
    error = parse_error(BASE + "redis: {}\nupstreams: {}\n")
    assert error.problems == [("", "invalid YAML: line 9, column 1: duplicate key 'upstreams'")]


# --- the command line, as a separate process ------------------------------------------


def flashgate(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` without the test variables, killed if it outlives the timeout."""
    environ = {k: v for k, v in os.environ.items() if k not in (UNSET, "FLASHGATE_ADMIN_TOKEN")}
    environ.update(env or {})
    command = [sys.executable, "-m", "gateway", *args]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"{' '.join(command)} still ran after {CLI_TIMEOUT:g}s")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.e2e
def test_cli_check_bad_file_exits_2_naming_file_and_field() -> None:
    file = CONFIGS / "bad" / "stock_negative.yaml"
    result = flashgate("check", "-c", str(file))

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{file}: campaigns[0].stock: must be >= 0, got -1"]


@pytest.mark.e2e
def test_cli_check_prints_every_problem(tmp_path: Path) -> None:
    file = tmp_path / "two.yaml"
    file.write_text(
        BASE.replace("stock: 10", "stock: -1") + "gateway: {port: 70000}\nredis: {timeot: 1s}\n",
        encoding="utf-8",
    )
    result = flashgate("check", "-c", str(file))

    assert result.returncode == 2, result.stderr
    assert sorted(result.stderr.splitlines()) == sorted(
        [
            f"{file}: campaigns[0].stock: must be >= 0, got -1",
            f"{file}: gateway.port: must be <= 65535, got 70000",
            f"{file}: redis.timeot: unknown field; did you mean 'timeout'?",
        ]
    )


@pytest.mark.e2e
def test_cli_check_json_on_a_bad_file() -> None:
    file = CONFIGS / "bad" / "upstream_not_defined.yaml"
    result = flashgate("check", "-c", str(file), "--json")

    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert json.loads(result.stdout) == {
        "file": str(file),
        "valid": False,
        "problems": [
            {
                "path": "campaigns[0].upstream",
                "reason": "no upstream named 'warehouse' (known: shop)",
            }
        ],
    }


@pytest.mark.e2e
def test_cli_check_json_on_invalid_yaml_has_an_empty_path() -> None:
    file = CONFIGS / "bad" / "duplicate_key.yaml"
    result = flashgate("check", "-c", str(file), "--json")

    assert result.returncode == 2, result.stderr
    document = json.loads(result.stdout)
    assert document["valid"] is False
    [problem] = document["problems"]
    assert problem["path"] == ""
    assert "duplicate key 'upstreams'" in problem["reason"]


@pytest.mark.e2e
def test_cli_check_good_file_says_valid() -> None:
    file = CONFIGS / "good" / "minimal.yaml"
    result = flashgate("check", "-c", str(file))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{file}: valid: 1 campaign(s) (tv-42), 1 upstream(s), redis embedded"
    )
    assert result.stderr == ""


@pytest.mark.e2e
def test_cli_check_json_good_file_with_its_variable_set() -> None:
    file = CONFIGS / "good" / "example.yaml"
    result = flashgate("check", "-c", str(file), "--json", env={"FLASHGATE_ADMIN_TOKEN": "x"})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "file": str(file),
        "valid": True,
        "campaigns": ["phone-1111"],
        "upstreams": ["shop"],
        "redis": "embedded",
    }


@pytest.mark.e2e
def test_cli_check_missing_file_exits_2(tmp_path: Path) -> None:
    file = tmp_path / "absent.yaml"
    result = flashgate("check", "-c", str(file))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{file}: cannot read: No such file or directory"]


@pytest.mark.e2e
def test_cli_run_bad_file_exits_2_before_starting_anything() -> None:
    file = CONFIGS / "bad" / "duplicate_route.yaml"
    result = flashgate("run", "-c", str(file))

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"{file}: campaigns[1].route: 'POST /seckill/phone-1111' is already used by campaigns[0]"
    ]
    assert result.stdout == ""


@pytest.mark.e2e
def test_cli_run_good_file_with_unset_variable_exits_2_naming_it() -> None:
    file = CONFIGS / "good" / "example.yaml"
    result = flashgate("run", "-c", str(file))

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"{file}: admin.token: environment variable FLASHGATE_ADMIN_TOKEN is not set"
    ]


# --- inputs that once crashed or slipped through the loader ---


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "{[a]: 1}\n", "? {a: 1}\n: 1\n"])
def test_unhashable_key_is_a_config_error(text: str) -> None:
    error = parse_error(text)
    assert error.problems[0][0] == ""


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes(BASE.encode() + b"# caf\xe9\n")
    error = config_error(file)
    assert error.problems[0][0] == ""


@pytest.mark.parametrize("raw", [".nan", ".inf", "1.0e+400"])
def test_non_finite_duration_is_refused(raw: str) -> None:
    error = parse_error(BASE + f"redis: {{timeout: {raw}}}\n")
    assert error.problems[0][0] == "redis.timeout"


@pytest.mark.parametrize("port", ["99999", "http"])
def test_upstream_url_with_an_impossible_port_is_refused(port: str) -> None:
    error = parse_error(BASE.replace(":8000", f":{port}"))
    assert error.problems[0][0] == "upstreams.shop.url"


def test_yaml_merge_keys_work() -> None:
    text = """\
upstreams:
  shop: {url: "http://127.0.0.1:8000"}
campaigns:
  - &first {id: a, route: POST /a, upstream: shop, stock: 1, per_user_limit: 2}
  - {<<: *first, id: b, route: POST /b}
"""
    settings = parse_settings(text, "merge.yaml", {})
    assert [(c.id, c.upstream, c.stock, c.per_user_limit) for c in settings.campaigns] == [
        ("a", "shop", 1, 2),
        ("b", "shop", 1, 2),
    ]


# --- Redis topologies in redis.url ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "nodes", "service", "node_url"),
    [
        ("redis://u:p@h:1/2", "standalone", (), None, "redis://u:p@h:1/2"),
        (
            "redis+sentinel://u:p%40w@s1:26379,[::1]:26380/mymaster/3?ssl_cert_reqs=none",
            "sentinel",
            (("s1", 26379), ("::1", 26380)),
            "mymaster",
            "redis://u:p%40w@10.0.0.9:7001/3?ssl_cert_reqs=none",
        ),
        ("redis+sentinel://s1/svc", "sentinel", (("s1", 26379),), "svc", "redis://10.0.0.9:7001/0"),
        (
            "rediss+cluster://:pw@c1:7000,c2",
            "cluster",
            (("c1", 7000), ("c2", 6379)),
            None,
            "rediss://:pw@10.0.0.9:7001/0",
        ),
    ],
)
def test_a_redis_url_names_its_topology(
    url: str,
    kind: str,
    nodes: tuple[tuple[str, int], ...],
    service: str | None,
    node_url: str,
) -> None:
    location = parse_redis_url(url)
    assert (location.kind, location.nodes, location.service) == (kind, nodes, service)
    assert location.node_url("10.0.0.9", 7001) == node_url


def test_a_refused_redis_url_does_not_show_its_password() -> None:
    error = parse_error('redis: {url: "ftp://user:hunter2-secret@host:1"}\n')
    assert "hunter2" not in str(error)
    assert "***" in str(error)


def test_check_reports_every_problem_in_one_pass_cross_references_included() -> None:
    """A bad stock, an undefined upstream, a duplicate route, deadlines that contradict each
    other and an unset variable: all in one run, none hidden behind another."""
    error = parse_error(
        """
admin: {token: "${FLASHGATE_TEST_SURELY_UNSET_VAR}"}
upstreams:
  shop: {url: "http://127.0.0.1:8000", timeout: 5s}
campaigns:
  - id: a
    route: POST /buy/a
    upstream: warehouse
    stock: -1
  - id: b
    route: POST /buy/a
    upstream: shop
    stock: 1
    forward_deadline: 2s
    starts_at: 2026-11-11T21:00:00+08:00
    ends_at: 2026-11-11T20:00:00+08:00
"""
    )
    found = dict(error.problems)
    assert found == {
        "admin.token": "environment variable FLASHGATE_TEST_SURELY_UNSET_VAR is not set",
        "campaigns[0].stock": "must be >= 0, got -1",
        "campaigns[0].upstream": "no upstream named 'warehouse' (known: shop)",
        "campaigns[1].route": "'POST /buy/a' is already used by campaigns[0]",
        "campaigns[1].forward_deadline": "must be longer than upstream 'shop''s timeout (5s)",
        "campaigns[1].ends_at": "must be after starts_at",
    }
    assert len(error.problems) == len(found)
