"""``flashgate admin``: the operators' calls of the admin API from a shell.

The address comes from the config (``admin.host``/``admin.port``; ``--url`` or
``$FLASHGATE_ADMIN_URL`` for another host), the token from the config as the
environment fills it in (``${FLASHGATE_ADMIN_TOKEN}``): ``admin.token``, or the first
of ``admin.tokens`` that has the scope the command needs, or the one ``--token-name``
names. Each command prints a line for people, or the API's JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, NamedTuple

from gateway.config import Settings, load_settings
from gateway.process.env import DENIED, FAILED, INVALID, OK, UNAVAILABLE

URL_ENV = "FLASHGATE_ADMIN_URL"
TIMEOUT = 30.0


class Call(NamedTuple):
    method: str
    path: str
    body: dict[str, Any] | None
    scope: str
    #: a line for people from the API's JSON answer
    say: Callable[[dict[str, Any]], str]


class AdminError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_arguments(admin: argparse.ArgumentParser) -> None:
    admin.add_argument("-c", "--config", required=True, help="YAML config file")
    admin.add_argument("--url", help=f"the admin API (default: from the config, or ${URL_ENV})")
    admin.add_argument("--token-name", help="use this one of admin.tokens")
    admin.add_argument("--json", action="store_true", help="print the API's JSON answer")
    calls = admin.add_subparsers(title="calls", required=True, metavar="CALL")
    stock = calls.add_parser("stock", help="change a campaign's stock (atomic against buying)")
    stock.add_argument("campaign")
    how = stock.add_mutually_exclusive_group(required=True)
    how.add_argument("--delta", type=int, help="add (or, negative, take away) this many units")
    how.add_argument("--set", type=int, dest="set_to", help="set what is available")
    stock.set_defaults(call=_stock)
    for name, helptext in (
        ("cancel", "give a reservation's units and quota back"),
        ("confirm", "a held order was paid: make the sale final"),
    ):
        one = calls.add_parser(name, help=helptext)
        one.add_argument("reservation_id", metavar="RID")
        one.set_defaults(call=_cancel if name == "cancel" else _confirm)
    reload = calls.add_parser("reload", help="have the gateway re-read its config file")
    reload.set_defaults(call=_reload)
    letters = calls.add_parser("dead-letters", help="orders the dispatcher gave up on")
    what = letters.add_subparsers(required=True, metavar="ACTION")
    listing = what.add_parser("list", help="list a campaign's dead letters")
    listing.add_argument("campaign")
    listing.add_argument("--count", type=int, default=100, help="at most this many (<= 1000)")
    listing.set_defaults(call=_list_letters)
    replay = what.add_parser(
        "replay", help="deliver dead letters again, taking their stock again (or saying why not)"
    )
    replay.add_argument("campaign")
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids (default: all)")
    replay.set_defaults(call=_replay)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    call: Call = args.call(args)
    try:
        base = _base_url(settings, args.url)
        token = _token(settings, call.scope, args.token_name)
        answer = _send(base, token, call)
    except AdminError as exc:
        print(f"flashgate admin: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(answer) if args.json else call.say(answer))
    return FAILED if answer.get("refused") else OK


def _base_url(settings: Settings, given: str | None) -> str:
    url = given or os.environ.get(URL_ENV)
    if url:
        return url.rstrip("/")
    if settings.admin is None:
        raise AdminError("the config has no admin section (or give --url)", INVALID)
    host = settings.admin.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{host}:{settings.admin.port}"


def _token(settings: Settings, scope: str, name: str | None) -> str:
    admin = settings.admin
    if admin is None:
        raise AdminError("the config has no admin section", INVALID)
    if name is not None:
        named = [t for t in admin.tokens if t.name == name]
        if not named:
            raise AdminError(f"admin.tokens has no token named {name!r}", INVALID)
        return named[0].token
    if admin.token is not None:
        return admin.token
    for token in admin.tokens:
        if scope in token.scopes:
            return token.token
    raise AdminError(f"no admin token in the config has the {scope!r} scope", DENIED)


def _send(base: str, token: str, call: Call) -> dict[str, Any]:
    data = json.dumps(call.body).encode() if call.body is not None else None
    request = urllib.request.Request(
        base + call.path,
        data=data,
        method=call.method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            document: dict[str, Any] = json.loads(response.read() or b"{}")
            return document
    except urllib.error.HTTPError as exc:
        raise AdminError(_refusal(exc), _exit_code(exc.code)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin API at {base}: {reason}", UNAVAILABLE) from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        problem = json.loads(exc.read())
        return f"{exc.code} {problem.get('code', '')}: {problem.get('detail', '')}"
    except ValueError:
        return f"{exc.code} {exc.reason}"


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return DENIED
    if status in (400, 422):
        return INVALID
    if status >= 500:
        return UNAVAILABLE
    return FAILED


def _stock(args: argparse.Namespace) -> Call:
    body = {"delta": args.delta} if args.delta is not None else {"set": args.set_to}

    def say(d: dict[str, Any]) -> str:
        return (
            f"{d['id']}: available {d['available']}, reserved {d['reserved']}, "
            f"sold {d['sold']}, stock total {d['stock_total']}"
        )

    return Call("POST", f"/campaigns/{args.campaign}/stock", body, "stock", say)


def _cancel(args: argparse.Namespace) -> Call:
    def say(d: dict[str, Any]) -> str:
        done = "cancelled now" if d.get("released_now") else "already back in stock"
        return f"{d['id']}: {d['state']} ({done})"

    return Call("POST", f"/reservations/{args.reservation_id}/cancel", None, "reservations", say)


def _confirm(args: argparse.Namespace) -> Call:
    def say(d: dict[str, Any]) -> str:
        done = "confirmed now" if d.get("confirmed_now") else "was final already"
        return f"{d['id']}: {d['state']} ({done})"

    return Call("POST", f"/reservations/{args.reservation_id}/confirm", None, "confirm", say)


def _reload(args: argparse.Namespace) -> Call:
    def say(d: dict[str, Any]) -> str:
        parts = [f"{k}: {', '.join(v) or '-'}" for k, v in d.items() if isinstance(v, list)]
        return f"{d.get('status', 'reloaded')}" + (f" ({'; '.join(parts)})" if parts else "")

    return Call("POST", "/reload", None, "reload", say)


def _list_letters(args: argparse.Namespace) -> Call:
    def say(d: dict[str, Any]) -> str:
        letters = d["dead_letters"]
        if not letters:
            return f"{d['campaign']}: no dead letters"
        return "\n".join(
            f"{x['id']}  {x['reservation_id']}  attempts {x['attempts']}  {x['reason']}"
            for x in letters
        )

    path = f"/campaigns/{args.campaign}/dead-letters?count={args.count}"
    return Call("GET", path, None, "read", say)


def _replay(args: argparse.Namespace) -> Call:
    def say(d: dict[str, Any]) -> str:
        lines = [f"{d['campaign']}: {len(d['replayed'])} replayed"]
        lines += [f"  {r['id']} not replayed: {r['reason']}" for r in d["refused"]]
        return "\n".join(lines)

    body = {"ids": args.ids} if args.ids else {}
    return Call(
        "POST", f"/campaigns/{args.campaign}/dead-letters/replay", body, "reservations", say
    )
