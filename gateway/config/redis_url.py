"""Where Redis is: one server, a Sentinel-monitored primary, or a Redis Cluster.

The URL forms are those of the ``limits`` library:

* ``redis://[user:password@]host[:port][/db]``, ``rediss://...``, ``unix:///path``:
  one server (redis-py reads these, query options included);
* ``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]`` (and
  ``rediss+sentinel://``): the sentinels to ask, and the service they monitor; the
  credentials are the data nodes' (the sentinels' own: ``redis.sentinel_password``);
* ``redis+cluster://[user:password@]host:port[,host:port...]`` (and
  ``rediss+cluster://``): seed nodes of a Redis Cluster (database 0 only).

Query options (TLS files, ``ssl_cert_reqs``...) apply to every data node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from gateway.config.schema import Invalid

Kind = Literal["standalone", "sentinel", "cluster"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
DEFAULT_PORTS: dict[Kind, int] = {"standalone": 6379, "sentinel": 26379, "cluster": 6379}
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class RedisLocation:
    kind: Kind
    #: The sentinels (sentinel), the seed nodes (cluster); empty for one server.
    nodes: tuple[tuple[str, int], ...]
    #: The URL of one server, as redis-py reads it; for a sentinel or a cluster, a
    #: template for any data node (see ``node_url``).
    url: str
    service: str | None = None
    tls: bool = False

    def node_url(self, host: str, port: int) -> str:
        """The URL of one data node, with this location's credentials, db and options."""
        if self.kind == "standalone":
            return self.url
        parts = urlsplit(self.url)
        name = f"[{host}]" if ":" in host else host
        return parts._replace(netloc=f"{_userinfo(self.url)}{name}:{port}").geturl()


def parse_redis_url(value: str) -> RedisLocation:
    """The location a ``redis.url`` names; raises Invalid saying what is wrong."""
    parts = urlsplit(value)
    if parts.scheme in SINGLE_SCHEMES:
        return RedisLocation("standalone", (), value, tls=parts.scheme == "rediss")
    if parts.scheme not in _SCHEMES:
        raise Invalid(
            "must be a redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
            f"redis+cluster:// or rediss+cluster:// URL, or 'embedded'; got {_shown(value)}"
        )
    kind, tls = _SCHEMES[parts.scheme]
    nodes = _nodes(parts.netloc.rpartition("@")[2], DEFAULT_PORTS[kind])
    segments = [unquote(s) for s in parts.path.split("/")[1:] if s != ""]
    service, db = _service_and_db(kind, segments)
    scheme = "rediss" if tls else "redis"
    template = f"{scheme}://{_userinfo(value)}placeholder/{db}"
    if parts.query:
        template += f"?{parts.query}"
    return RedisLocation(kind, nodes, template, service, tls)


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not hosts:
        raise Invalid("names no host: list at least one host:port")
    nodes = []
    for item in hosts.split(","):
        match = _HOST.match(item.strip())
        if match is None:
            raise Invalid(f"{item!r} is not a host or host:port")
        port = int(match.group(2) or default_port)
        if not 0 < port < 65536:
            raise Invalid(f"{item!r} has an impossible port")
        nodes.append((match.group(1).strip("[]"), port))
    return tuple(nodes)


def _service_and_db(kind: Kind, segments: list[str]) -> tuple[str | None, int]:
    if kind == "cluster":
        if segments and segments != ["0"]:
            raise Invalid("a Redis Cluster has database 0 only: no path after the hosts")
        return None, 0
    if not segments:
        raise Invalid("names no service: redis+sentinel://host:port[,host:port]/SERVICE[/db]")
    if len(segments) > 2 or not _SERVICE.match(segments[0]):
        raise Invalid(f"{'/'.join(segments)!r} is not SERVICE or SERVICE/db")
    if len(segments) == 2 and not segments[1].isdigit():
        raise Invalid(f"the database must be a number, got {segments[1]!r}")
    return segments[0], int(segments[1]) if len(segments) == 2 else 0


def _userinfo(url: str) -> str:
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return ""
    info = netloc.rpartition("@")[0]
    user, colon, password = info.partition(":")
    encoded = quote(unquote(user), safe="") + (
        f":{quote(unquote(password), safe='')}" if colon else ""
    )
    return f"{encoded}@"


def _shown(value: str) -> str:
    """The URL without its password, for an error message."""
    parts = urlsplit(value)
    if parts.password:
        value = value.replace(f":{parts.password}@", ":***@", 1)
    return repr(value)
