"""Loading a configuration file: YAML without duplicate keys, ``${VAR}`` from the
environment, the schema, then the checks that span fields. Every problem is
reported with its field path, all of them at once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.config.errors import ConfigError
from gateway.config.redis_url import parse_redis_url
from gateway.config.schema import FromEnvironment, Problems, build
from gateway.config.settings import JwtSettings, Settings
from gateway.config.values import Route

_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, expand ``${VAR}`` and validate a YAML file; raises ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, [("", f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})")]
        ) from exc
    return parse_settings(text, source, environ)


def parse_settings(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> Settings:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {_yaml_reason(exc)}")]) from exc
    problems = Problems()
    data = _expand(data, "", os.environ if environ is None else environ, problems)
    if problems.items:
        raise ConfigError(source, problems.items)
    settings = build(Settings, data, "", problems)
    if settings is not None:
        _check_relations(settings, problems)
    if settings is None or problems.items:
        raise ConfigError(source, problems.items)
    return settings


def _check_relations(s: Settings, problems: Problems) -> None:
    for name in s.upstreams:
        if not _UPSTREAM_NAME.fullmatch(name):
            problems.add(f"upstreams.{name}", "names are 1 to 64 letters, digits, _ or -")
    seen_ids: dict[str, int] = {}
    seen_routes: dict[Route, int] = {}
    for i, c in enumerate(s.campaigns):
        at = f"campaigns[{i}]"
        if c.id in seen_ids:
            problems.add(f"{at}.id", f"{c.id!r} is already used by campaigns[{seen_ids[c.id]}]")
        seen_ids.setdefault(c.id, i)
        if c.route in seen_routes:
            problems.add(
                f"{at}.route", f"'{c.route}' is already used by campaigns[{seen_routes[c.route]}]"
            )
        seen_routes.setdefault(c.route, i)
        upstream = s.upstreams.get(c.upstream)
        if upstream is None:
            known = ", ".join(s.upstreams) or "none defined"
            problems.add(f"{at}.upstream", f"no upstream named {c.upstream!r} (known: {known})")
        elif c.forward_deadline <= upstream.timeout:
            problems.add(
                f"{at}.forward_deadline",
                f"must be longer than upstream {c.upstream!r}'s timeout ({upstream.timeout:g}s)",
            )
        if c.starts_at and c.ends_at and c.ends_at <= c.starts_at:
            problems.add(f"{at}.ends_at", "must be after starts_at")
    if (
        s.admin
        and (s.admin.host, s.admin.port) == (s.gateway.host, s.gateway.port)
        and s.admin.port
    ):
        problems.add("admin.port", "must differ from gateway.port on the same host")
    if s.identity.jwt is not None:
        _check_jwt(s.identity.jwt, problems)
    _check_redis(s, problems)
    if s.redis.wait_for_replicas and s.redis.replica_timeout >= s.redis.timeout:
        problems.add(
            "redis.replica_timeout", f"must be shorter than redis.timeout ({s.redis.timeout:g}s)"
        )


def _check_redis(s: Settings, problems: Problems) -> None:
    kind = parse_redis_url(s.redis.url).kind if s.redis.url else "embedded"
    if s.redis.sentinel_password is not None and kind != "sentinel":
        problems.add("redis.sentinel_password", "applies to a redis+sentinel:// url only")
    if s.redis.wait_for_aof and kind == "embedded":
        problems.add("redis.wait_for_aof", "the embedded redis-server keeps no AOF")


#: RFC 7518 3.2: an HMAC key at least as long as the hash.
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def _check_jwt(jwt: JwtSettings, problems: Problems) -> None:
    """One key kind, matching the algorithms: mixing them invites algorithm confusion."""
    at = "identity.jwt"
    hmac = {a.startswith("HS") for a in jwt.algorithms}
    if not jwt.algorithms:
        problems.add(f"{at}.algorithms", "must name at least one algorithm")
    elif len(hmac) > 1:
        problems.add(f"{at}.algorithms", "must not mix HS* with RS*/ES* algorithms")
    elif (jwt.secret is None) == (jwt.public_key is None):
        problems.add(at, "needs exactly one of secret (HS*) or public_key (RS*, ES*)")
    elif hmac == {True}:
        strongest = max(jwt.algorithms)
        if jwt.secret is None:
            problems.add(f"{at}.secret", "HS* algorithms need a secret")
        elif len(jwt.secret.encode()) < _HMAC_KEY_BYTES[strongest]:
            needed = _HMAC_KEY_BYTES[strongest]
            problems.add(f"{at}.secret", f"{strongest} needs a secret of {needed} bytes or more")
    elif jwt.public_key is None:
        problems.add(f"{at}.public_key", "RS*/ES* algorithms need a public_key")
    else:
        try:
            load_pem_public_key(jwt.public_key.encode())
        except ValueError as exc:
            problems.add(f"{at}.public_key", f"is not a PEM public key: {exc}")


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, path: str, environ: Mapping[str, str], problems: Problems) -> Any:
    """Replace ``${VAR}`` (and ``${VAR:-default}``) in string values; ``$$`` is a dollar.
    What came from the environment is FromEnvironment text (see there)."""
    if isinstance(value, str):
        expanded = False

        def substitute(match: re.Match[str]) -> str:
            nonlocal expanded
            if match.group(0) == "$$":
                return "$"
            expanded = True
            name, default = match.group(1), match.group(2)
            if environ.get(name):
                return environ[name]
            if default is not None:  # like the shell's ${VAR:-x}: unset or empty
                return default
            if name in environ:
                return ""
            problems.add(path, f"environment variable {name} is not set")
            return ""

        text = _VARIABLE.sub(substitute, value)
        return FromEnvironment(text) if expanded else text
    if isinstance(value, dict):
        return {
            k: _expand(v, f"{path}.{k}" if path else str(k), environ, problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", environ, problems) for i, v in enumerate(value)]
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor": merged keys may be overridden, that is their purpose
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a key must be a plain value, not {type(key).__name__}",
                key_node.start_mark,
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return problem
