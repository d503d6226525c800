"""What a buyer's request says: how many, and its Idempotency-Key.

Everything here is checked before Redis is asked anything, so bad input is
refused with a specific problem and changes nothing.

The Idempotency-Key is a structured-field string (draft-ietf-httpapi-idempotency-
key-header, RFC 8941): ``"abc"``; the bare form ``abc`` that flashgate always took is
the same key. A key is bound to the request's fingerprint (route, quantity, body):
reused for another request, it gets 422 ``idempotency-key-mismatch``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any, NamedTuple

from aiohttp import web

from gateway.problems import Code, Problem

IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,128}")


class Order(NamedTuple):
    quantity: int
    body: bytes


_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_ESCAPE = re.compile(r'\\(["\\])')


def idempotency_key(request: web.BaseRequest) -> str:
    """The Idempotency-Key header's key ("" when absent), or a 400."""
    values = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not values:
        return ""
    key = parse_key(values[0]) if len(values) == 1 else None
    if key is None:
        raise Problem(
            Code.BAD_REQUEST,
            f'{IDEMPOTENCY_HEADER} must be one header: a string ("...") or bare text of 1 to '
            "128 printable ASCII characters",
        )
    return key


def parse_key(value: str) -> str | None:
    """The key of a header value: a structured-field string, unescaped, or today's bare
    form as it is; None when it is neither."""
    if value.startswith('"'):
        match = _SF_STRING.fullmatch(value)
        if match is None:
            return None
        value = _ESCAPE.sub(r"\1", match.group(1))
    return value if _IDEMPOTENCY_KEY.fullmatch(value) else None


def fingerprint(route: str, quantity: int, body: bytes) -> str:
    """What a request asked, for telling a retry from another request reusing its key."""
    digest = hashlib.blake2b(f"{route}\n{quantity}\n".encode(), digest_size=16)
    digest.update(body)
    return digest.hexdigest()


async def read_order(
    request: web.BaseRequest, max_quantity: int, max_body: int, deadline: float
) -> Order:
    """The body, read within the size limit and the deadline, and the quantity it asks
    for (default 1)."""
    body = await read_body(request, max_body, deadline)
    if not body.strip():
        return Order(1, body)
    return Order(_quantity(json_object(body), max_quantity), body)


async def read_body(request: web.BaseRequest, max_body: int, deadline: float) -> bytes:
    """The body, read within the size limit (413) and the deadline (408)."""
    if request.content_length is not None and request.content_length > max_body:
        raise _too_large(max_body)
    try:
        if request.content.is_eof():  # it came whole with the head: nothing to wait for
            body = request.content.read_nowait()
            if len(body) > max_body:
                raise _too_large(max_body)
            return body
        async with asyncio.timeout(deadline):
            return await _read_body(request, max_body)
    except TimeoutError:
        raise Problem(
            Code.REQUEST_TIMEOUT, f"the body did not arrive within {deadline:g}s"
        ) from None
    except (ConnectionError, web.RequestPayloadError) as exc:  # a broken body, or gone
        raise Problem(Code.BAD_REQUEST, f"the body could not be read: {exc}") from None


async def _read_body(request: web.BaseRequest, max_body: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():  # a chunked body has no Content-Length
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_body: int) -> Problem:
    return Problem(
        Code.TOO_LARGE, f"the body is larger than {max_body} bytes", max_body_bytes=max_body
    )


def json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # [[[[... nests too deep
        raise Problem(Code.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Problem(Code.BAD_REQUEST, "the body must be a JSON object")
    return document


def _quantity(document: dict[str, Any], max_quantity: int) -> int:
    quantity = document.get("quantity", 1)
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise Problem(Code.BAD_REQUEST, f"quantity must be an integer, got {json.dumps(quantity)}")
    if not 1 <= quantity <= max_quantity:
        raise Problem(
            Code.BAD_REQUEST,
            f"quantity must be between 1 and {max_quantity}, got {quantity}",
            max_quantity=max_quantity,
        )
    return quantity
