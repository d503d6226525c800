"""The client's address: the peer, or what a trusted proxy says in X-Forwarded-For.

X-Forwarded-For is written by whoever sent the request, so it is believed only
when the peer is one of ``gateway.trusted_proxies``; then the client is the
rightmost address in the chain that is not itself a trusted proxy. What the backend
is told (``proxy_headers``) is that chain and nothing to its left: a client's own
``X-Forwarded-For: 6.6.6.6`` never reaches it, nor its ``Forwarded`` or ``X-Real-IP``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp import web

Networks = Sequence[IPv4Network | IPv6Network]


def _trusted(address: str, networks: Networks) -> bool:
    try:
        parsed = ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)


def client_ip(request: web.BaseRequest, trusted: Networks) -> str:
    return chain(request, trusted)[0]


def chain(request: web.BaseRequest, trusted: Networks) -> list[str]:
    """The addresses the request came through that can be believed, the client first and
    the peer last: the peer alone unless it is a trusted proxy; then the trusted proxies
    it names, right to left, and the first address that is not one (the client)."""
    peer = request.remote or ""
    if not trusted or not _trusted(peer, trusted):
        return [peer]
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for hop in header.split(",")
    ]
    believed = [peer]
    for hop in reversed(hops):
        try:
            ip_address(hop)
        except ValueError:
            break  # a garbled hop: trust nothing further left
        believed.append(hop)
        if not _trusted(hop, trusted):
            break
    believed.reverse()
    return believed


def forwarded_for(request: web.BaseRequest, trusted: Networks) -> str:
    """The X-Forwarded-For to send upstream: the client it determined, then the trusted
    proxies up to the peer (nothing a client wrote to the left of that)."""
    return ", ".join(chain(request, trusted))


_PROTO = frozenset({"http", "https"})
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def proxy_headers(request: web.BaseRequest, trusted: Networks) -> dict[str, str]:
    """What the gateway tells the backend about the connection: X-Forwarded-For (the
    client first), X-Real-IP (the client), X-Forwarded-Proto and -Host (a trusted proxy's
    when it sent valid ones: it terminated TLS; else what this gateway saw), and the same
    as RFC 7239 Forwarded."""
    hops = chain(request, trusted)
    proto, host = request.scheme, request.host
    if len(hops) > 1:  # the peer is a trusted proxy: its word on the outer request stands
        given_proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        given_host = request.headers.get("X-Forwarded-Host", "").strip()
        proto = given_proto if given_proto in _PROTO else proto
        host = given_host if _HOST.fullmatch(given_host) else host
    elements = [f"for={_node(hop)}" for hop in hops]
    elements[0] += f";proto={proto}" + (f';host="{host}"' if _HOST.fullmatch(host) else "")
    return {
        "X-Forwarded-For": ", ".join(hops),
        "X-Real-IP": hops[0],
        "X-Forwarded-Proto": proto,
        "X-Forwarded-Host": host,
        "Forwarded": ", ".join(elements),
    }


def _node(address: str) -> str:
    """An address as a Forwarded node: IPv6 quoted and bracketed, "unknown" for none."""
    if not address:
        return "unknown"
    return f'"[{address}]"' if ":" in address else address


def rate_key(address: str) -> str:
    """What a per-IP limit counts: the address, or for IPv6 its /64 (one subscriber
    usually holds a whole /64 and could take a fresh address for every request)."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ip_network(f"{parsed}/64", strict=False))
    return str(parsed)
