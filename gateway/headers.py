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
        "x-delivery-attempt",
    }
)
#: What a client says about the connection: believed only from gateway.trusted_proxies,
#: always dropped from what the client sent and written anew by the gateway itself.
CONNECTION_HEADERS = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
)
#: The gateway's name in Via (RFC 9110 7.6.3) and Server: no version to fingerprint.
PRODUCT = "flashgate"
VIA = f"1.1 {PRODUCT}"
#: What a configured upstream header may not name: the gateway sets these itself
#: (identity, reservation, body framing, the forwarding chain) or they belong to one
#: connection. Allowed: a credential for a proxy in front of the backend, the backend's
#: virtual host (Host), and X-Forwarded-Proto/-Host as a TLS-terminating balancer in
#: front of the gateway would have them (configured values replace the gateway's own).
NOT_CONFIGURABLE = (
    (HOP_BY_HOP - {"proxy-authorization"})
    | (GATEWAY_HEADERS - {"host"})
    | frozenset({"x-forwarded-for"})
)
