"""The client's address: the peer, or what a trusted proxy says in X-Forwarded-For.

X-Forwarded-For is written by whoever sent the request, so it is believed only
when the peer is one of ``gateway.trusted_proxies``; then the client is the
rightmost address in the chain that is not itself a trusted proxy.
"""

from __future__ import annotations

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
    peer = request.remote or ""
    if not trusted or not _trusted(peer, trusted):
        return peer
    chain = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for hop in header.split(",")
    ]
    client = peer
    for hop in reversed(chain):
        try:
            ip_address(hop)
        except ValueError:
            break  # a garbled hop: trust nothing further left
        client = hop
        if not _trusted(hop, trusted):
            break
    return client


def forwarded_for(request: web.BaseRequest, trusted: Networks) -> str:
    """The X-Forwarded-For to send upstream: the trusted chain plus the peer."""
    peer = request.remote or ""
    previous = ", ".join(request.headers.getall("X-Forwarded-For", []))
    if previous and trusted and _trusted(peer, trusted):
        return f"{previous}, {peer}"
    return peer


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
