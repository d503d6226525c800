"""Forwarding winners to the shop's order backend: the HTTP/1.1 client and its pool,
the upstream with its timeouts and metrics, settling a reservation by the backend's
answer, and queue mode's delivery from a Redis stream."""
