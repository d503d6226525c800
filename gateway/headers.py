"""Header names with a fixed meaning at the gateway, shared by the forward and the
config check."""

#: Headers that belong to one connection, never forwarded in either direction (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Headers the gateway sets itself, or that no longer describe the body it forwards
#: (aiohttp decodes a compressed request body); a client's own copies are dropped.
GATEWAY_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-encoding",
        "x-reservation-id",
        "x-campaign-id",
        "x-user-id",
        "x-quantity",
    }
)
#: What a configured upstream header may not name: the gateway sets these itself
#: (identity, reservation, forwarding chain) or they belong to one connection (but a
#: credential for a proxy in front of the backend).
NOT_CONFIGURABLE = (
    (HOP_BY_HOP - {"proxy-authorization"})
    | GATEWAY_HEADERS
    | frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
)
