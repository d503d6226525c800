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
from gateway.config.schema import FromEnvironment, Problems, build, salvage
from gateway.config.settings import (
    SCOPES,
    AdminToken,
    CorsSettings,
    JwtSettings,
    RedisSettings,
    Settings,
    WaitingRoomSettings,
)
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
    """Every problem of the file in one pass: unset variables, the fields, and the checks
    across fields (on whatever could be read where other fields are invalid)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {_yaml_reason(exc)}")]) from exc
    unset = Problems()
    data = _expand(data, "", os.environ if environ is None else environ, unset)
    problems = Problems()
    settings = build(Settings, data, "", problems)
    _check_relations(salvage(Settings, data) if settings is None else settings, problems)
    # a field whose variable is unset is reported as that, not also as an empty value
    blamed = {path for path, _ in unset.items}
    found = unset.items + [(p, r) for p, r in problems.items if p not in blamed]
    if settings is None or found:
        raise ConfigError(source, found)
    return settings


View = Any  # a settings object, or the dict of the fields that were valid (see salvage)


def _get(view: View, name: str, default: Any = None) -> Any:
    if isinstance(view, dict):
        return view.get(name, default)
    return getattr(view, name, default)


def _check_relations(s: View, problems: Problems) -> None:
    upstreams = _get(s, "upstreams", {}) or {}
    if isinstance(upstreams, Mapping):
        for name in upstreams:
            if not _UPSTREAM_NAME.fullmatch(name):
                problems.add(f"upstreams.{name}", "names are 1 to 64 letters, digits, _ or -")
    _check_campaigns(_get(s, "campaigns", ()) or (), upstreams, problems)
    _check_carts(_get(s, "carts", ()) or (), _get(s, "campaigns", ()) or (), upstreams, problems)
    admin, gateway = _get(s, "admin"), _get(s, "gateway")
    if admin is not None:
        _check_admin(admin, problems)
        where = (_get(admin, "host", "127.0.0.1"), _get(admin, "port", 9090))
        if (
            gateway is not None
            and where[1]
            and where
            == (
                _get(gateway, "host", "127.0.0.1"),
                _get(gateway, "port", 8080),
            )
        ):
            problems.add("admin.port", "must differ from gateway.port on the same host")
    if gateway is not None:
        _check_gateway(gateway, problems)
    jwt = _get(_get(s, "identity"), "jwt")
    if isinstance(jwt, JwtSettings):
        _check_jwt(jwt, problems)
    _check_waiting_rooms(_get(s, "campaigns", ()) or (), jwt, problems)
    redis = _get(s, "redis")
    if isinstance(redis, RedisSettings):
        _check_redis(redis, problems)
        if redis.wait_for_replicas and redis.replica_timeout >= redis.timeout:
            problems.add(
                "redis.replica_timeout", f"must be shorter than redis.timeout ({redis.timeout:g}s)"
            )


def _check_campaigns(campaigns: Any, upstreams: Any, problems: Problems) -> None:
    seen_ids: dict[str, int] = {}
    seen_routes: dict[Route, int] = {}
    known = upstreams if isinstance(upstreams, Mapping) else {}
    for i, c in enumerate(campaigns):
        at = f"campaigns[{i}]"
        for name, seen in (("id", seen_ids), ("route", seen_routes)):
            value = _get(c, name)
            if value is None:
                continue
            if value in seen:
                shown = repr(value) if name == "id" else f"'{value}'"
                problems.add(f"{at}.{name}", f"{shown} is already used by campaigns[{seen[value]}]")
            seen.setdefault(value, i)
        _check_campaign(c, at, known, problems)


def _check_campaign(c: View, at: str, upstreams: Mapping[str, Any], problems: Problems) -> None:
    name = _get(c, "upstream")
    if name is not None:
        upstream = upstreams.get(name)
        deadline = _get(c, "forward_deadline")
        timeout = _get(upstream, "timeout") if upstream is not None else None
        if upstream is None:
            known = ", ".join(upstreams) or "none defined"
            problems.add(f"{at}.upstream", f"no upstream named {name!r} (known: {known})")
        elif deadline is not None and timeout is not None and deadline <= timeout:
            problems.add(
                f"{at}.forward_deadline",
                f"must be longer than upstream {name!r}'s timeout ({timeout:g}s)",
            )
    shards = _get(c, "shards")
    if _get(c, "waiting_room") is not None and isinstance(shards, int) and shards > 1:
        problems.add(
            f"{at}.waiting_room",
            f"a waiting room admits by the stock of one shard; this campaign has {shards} "
            "(use shards: 1 with a waiting room)",
        )
    starts, ends = _get(c, "starts_at"), _get(c, "ends_at")
    if starts and ends and ends <= starts:
        problems.add(f"{at}.ends_at", "must be after starts_at")
    backoff, most = _get(c, "retry_backoff"), _get(c, "max_retry_backoff")
    if backoff is not None and most is not None and backoff > most:
        problems.add(
            f"{at}.max_retry_backoff", f"must not be shorter than retry_backoff ({backoff:g}s)"
        )


def _check_carts(carts: Any, campaigns: Any, upstreams: Any, problems: Problems) -> None:
    """A cart sells campaigns of this file, each listed once, none behind a waiting room
    (a cart has no pass to show); its id and route are its own."""
    by_id = {_get(c, "id"): c for c in campaigns if _get(c, "id") is not None}
    routes = {_get(c, "route"): f"campaigns[{i}]" for i, c in enumerate(campaigns)}
    known = upstreams if isinstance(upstreams, Mapping) else {}
    seen_ids: dict[str, int] = {}
    for i, cart in enumerate(carts):
        at = f"carts[{i}]"
        cart_id, path = _get(cart, "id"), _get(cart, "route")
        if cart_id in by_id:
            problems.add(f"{at}.id", f"{cart_id!r} is already a campaign's id")
        elif cart_id in seen_ids:
            problems.add(f"{at}.id", f"{cart_id!r} is already used by carts[{seen_ids[cart_id]}]")
        if cart_id is not None:
            seen_ids.setdefault(cart_id, i)
        if path is not None and path in routes:
            problems.add(f"{at}.route", f"'{path}' is already used by {routes[path]}")
        elif path is not None:
            routes[path] = at
        listed = _get(cart, "campaigns")
        if listed is not None:
            _check_cart_campaigns(listed, by_id, f"{at}.campaigns", problems)
        most = _get(cart, "max_items")
        if most is not None and listed and most > len(listed):
            problems.add(
                f"{at}.max_items", f"must not be more than the campaigns listed ({len(listed)})"
            )
        _check_campaign(cart, at, known, problems)


def _check_cart_campaigns(
    listed: Any, campaigns: Mapping[str, Any], at: str, problems: Problems
) -> None:
    if not listed:
        problems.add(at, "must list at least one campaign")
    seen: dict[str, int] = {}
    for j, campaign_id in enumerate(listed):
        campaign = campaigns.get(campaign_id)
        if campaign_id in seen:
            problems.add(
                f"{at}[{j}]", f"{campaign_id!r} is listed already, at [{seen[campaign_id]}]"
            )
        elif campaign is None:
            shown = ", ".join(campaigns) or "none defined"
            problems.add(f"{at}[{j}]", f"no campaign {campaign_id!r} (known: {shown})")
        elif _get(campaign, "waiting_room") is not None:
            problems.add(
                f"{at}[{j}]",
                f"campaign {campaign_id!r} has a waiting room: its items are bought with a "
                "pass, which a cart does not carry",
            )
        seen.setdefault(campaign_id, j)


def _check_waiting_rooms(campaigns: Any, jwt: View, problems: Problems) -> None:
    """A waiting room where it makes sense: a shuffle needs a start and a pre-queue to
    shuffle, a pre-queue needs a start to open before, and its secret must not be the
    identity's (a pass would then pass for a login)."""
    for i, c in enumerate(campaigns):
        room = _get(c, "waiting_room")
        if not isinstance(room, WaitingRoomSettings):
            continue
        at = f"campaigns[{i}].waiting_room"
        starts = _get(c, "starts_at")
        if room.mode == "random" and starts is None:
            problems.add(f"{at}.mode", "random shuffles who joined before starts_at: set starts_at")
        elif room.mode == "random" and room.opens_before is None:
            problems.add(
                f"{at}.mode", "random shuffles a pre-queue: set opens_before (how long before)"
            )
        if room.opens_before is not None and starts is None:
            problems.add(f"{at}.opens_before", "applies only with the campaign's starts_at")
        if room.secret == _get(jwt, "secret"):
            problems.add(f"{at}.secret", "must differ from identity.jwt.secret")


def _check_admin(admin: View, problems: Problems) -> None:
    tokens = _get(admin, "tokens", ()) or ()
    token_invalid = isinstance(admin, dict) and "token" not in admin
    if _get(admin, "token") is None and not tokens and not token_invalid:
        problems.add("admin.token", "is required (or admin.tokens, scoped tokens)")
    names: dict[str, int] = {}
    secrets: dict[str, int] = {}
    for i, token in enumerate(tokens):
        name, secret_value = _get(token, "name"), _get(token, "token")
        if name is not None:
            if name in names or name == "admin":
                problems.add(
                    f"admin.tokens[{i}].name",
                    f"{name!r} is already used" + (" (by admin.token)" if name == "admin" else ""),
                )
            names.setdefault(name, i)
        if secret_value is not None:
            if secret_value in secrets or secret_value == _get(admin, "token"):
                problems.add(f"admin.tokens[{i}].token", "is the same as another admin token")
            secrets.setdefault(secret_value, i)
        if isinstance(token, AdminToken) and not token.scopes:
            problems.add(
                f"admin.tokens[{i}].scopes", f"must name at least one of {', '.join(SCOPES)}"
            )


def _check_gateway(gateway: View, problems: Problems) -> None:
    cors = _get(gateway, "cors")
    if isinstance(cors, CorsSettings) and cors.allow_credentials and "*" in cors.allow_origins:
        problems.add("gateway.cors.allow_credentials", "cannot be true while allow_origins has '*'")
    header, body = _get(gateway, "header_timeout"), _get(gateway, "keepalive_timeout")
    if header is not None and body is not None and header > body:
        problems.add(
            "gateway.header_timeout", f"must not be longer than keepalive_timeout ({body:g}s)"
        )


def _check_redis(redis: RedisSettings, problems: Problems) -> None:
    kind = parse_redis_url(redis.url).kind if redis.url else "embedded"
    if redis.sentinel_password is not None and kind != "sentinel":
        problems.add("redis.sentinel_password", "applies to a redis+sentinel:// url only")
    if redis.wait_for_aof and kind == "embedded":
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
