"""The `--broker` URL: its one parser, used by config validation, `create_broker` and the Redis broker.

Accepted forms (the list `SCHEMES` below is the only list of schemes in the code base):

    memory://  (or "memory", or empty)       one process, no Redis (the default)
    redis://[user:password@]host[:port][/db]
    rediss://...                             the same over TLS
    unix:///path/redis.sock[?db=N]           a local Redis over a Unix socket
    redis+cluster://[user:password@]host:port[,host:port...]    Redis Cluster seed nodes (db 0 only)
    rediss+cluster://...                     the same over TLS
    redis+sentinel://[user:password@]host[:port][,host:port...]/service[/db]
                                             Sentinels (port 26379 by default) naming the primary of
                                             `service`; the credentials are the primary's
    rediss+sentinel://...                    the same, TLS to the primary

Query parameters (`?name=value&...`): `db` (unix://), and for the TLS schemes `ssl_ca_certs`
(a PEM file of CAs to trust, e.g. a private CA), `ssl_cert_reqs` (required | optional |
none), `ssl_certfile`/`ssl_keyfile` (a client certificate) and `ssl_check_hostname`; for the
Sentinel schemes `sentinel_password` (the sentinels' own password, if they require one). Any
other parameter is refused here, at validation, instead of failing at the first connect
(redis-py would pass unknown names on as keyword arguments, and the broker sets its own
timeouts and protocol).

A URL this module accepts is one `create_broker` starts with; tests/test_broker_urls.py starts
a gateway process with every form against real redis-server processes to hold that.
Errors never echo the URL: it may hold a password. Imports only the standard library.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

# scheme -> (cluster?, TLS?)
SCHEMES = {
    "memory": (False, False),
    "redis": (False, False),
    "rediss": (False, True),
    "unix": (False, False),
    "redis+cluster": (True, False),
    "rediss+cluster": (True, True),
    "redis+sentinel": (False, False),
    "rediss+sentinel": (False, True),
}
FORMS = ("memory://, redis://host:port/db, rediss://host:port/db, unix:///path/redis.sock?db=N, "
         "redis+cluster://host:port,host:port, rediss+cluster://host:port,host:port "
         "or redis+sentinel://host:port,host:port/service-name")
_TLS_PARAMS = {"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
_CERT_REQS = ("required", "optional", "none")
_BOOLS = ("true", "false", "yes", "no", "1", "0", "on", "off")


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL. `nodes` are single-node URLs (one per cluster seed), in the form
    redis-py's `parse_url` reads; empty for memory://."""

    scheme: str
    cluster: bool = False
    tls: bool = False
    nodes: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    # Sentinel schemes: the sentinels' (host, port) and the service name; `nodes` then holds
    # one URL for the primary whose host:port (127.0.0.1:6379) the sentinels will replace.
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def memory(self) -> bool:
        return self.scheme == "memory"


def parse(url: str) -> BrokerUrl:
    """Parse and check a broker URL; ValueError with a message that does not repeat the URL."""
    if url in ("", "memory", "memory://"):
        return BrokerUrl("memory")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()   # RFC 3986 section 3.1: schemes are case-insensitive
    if not sep or scheme not in SCHEMES:
        problem = f"unsupported scheme {scheme!r}" if sep else "not a URL (no scheme://)"
        raise ValueError(f"{problem}: use {FORMS}")
    if scheme == "memory":
        raise ValueError("memory:// takes no address")
    cluster, tls = SCHEMES[scheme]
    # The query first: its values may hold slashes (ssl_ca_certs=/etc/ssl/ca.pem), the rest cannot hold "?".
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    params = _params(query, scheme, tls)
    if scheme == "unix":
        socket_path = "/" + path
        if netloc:
            raise ValueError("unix:// takes a socket path, not a host: unix:///path/redis.sock (three slashes)")
        if not path:
            raise ValueError("unix:// needs a socket path (unix:///path/redis.sock?db=0)")
        db = params.get("db", "0")
        if not db.isdigit():
            raise ValueError(f"the Redis database {db!r} is not a number")
        return BrokerUrl(scheme, False, False, (f"unix://{socket_path}" + (f"?{query}" if query else ""),), params)
    if scheme.endswith("+sentinel"):
        return _sentinel(scheme, tls, netloc, path, query, params)
    db = path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the Redis database {db!r} is not a number")
    if cluster and db not in ("", "0"):
        raise ValueError("Redis Cluster has only database 0")
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = hosts.split(",") if cluster else [hosts]
    if cluster and not any(seeds):
        raise ValueError(f"{scheme}:// needs at least one seed node (host:port,host:port)")
    base = "rediss" if tls else "redis"
    nodes = []
    for host in seeds:
        try:
            parts = urlsplit(f"{base}://{host}")
            if not host or not parts.hostname:
                raise ValueError("a host is missing")
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"invalid Redis address {host!r}: {exc}") from None
        nodes.append(f"{base}://{userinfo}{at}{host}" + (f"/{db}" if db else "") + (f"?{query}" if query else ""))
    return BrokerUrl(scheme, cluster, tls, tuple(nodes), params)


def _sentinel(scheme: str, tls: bool, netloc: str, path: str, query: str, params: dict) -> BrokerUrl:
    userinfo, at, hosts = netloc.rpartition("@")
    sentinels = []
    for host in hosts.split(","):
        try:
            parts = urlsplit(f"redis://{host}")
            if not host or not parts.hostname:
                raise ValueError("a host is missing")
            sentinels.append((parts.hostname, parts.port or 26379))
        except ValueError as exc:
            raise ValueError(f"invalid Sentinel address {host!r}: {exc}") from None
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"{scheme}:// needs the service name: {scheme}://host:port,host:port/mymaster")
    if db and not db.isdigit():
        raise ValueError(f"the Redis database {db!r} is not a number")
    rest = "&".join(f"{k}={v}" for k, v in parse_qsl(query, keep_blank_values=True) if k != "sentinel_password")
    base = "rediss" if tls else "redis"
    node = f"{base}://{userinfo}{at}127.0.0.1:6379/{db or 0}" + (f"?{rest}" if rest else "")
    return BrokerUrl(scheme, False, tls, (node,), params, tuple(sentinels), unquote(service))


def _params(query: str, scheme: str, tls: bool) -> dict:
    params = dict(parse_qsl(query, keep_blank_values=True))
    allowed = {"db"} if scheme == "unix" else _TLS_PARAMS if tls else set()
    if scheme.endswith("+sentinel"):
        allowed = allowed | {"sentinel_password"}
    for name, value in params.items():
        if name not in allowed:
            if name in _TLS_PARAMS:
                hint = "TLS parameters need rediss:// or rediss+cluster://"
            elif name == "db" and scheme != "unix":
                hint = "give the database as the path: redis://host:port/1"
            else:
                hint = f"supported: {', '.join(sorted(allowed))}" if allowed else f"{scheme}:// takes no parameters"
            raise ValueError(f"unsupported URL parameter {name!r} ({hint})")
        if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
        if name == "ssl_check_hostname" and value.lower() not in _BOOLS:
            raise ValueError("ssl_check_hostname must be true or false")
        if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and not os.access(value, os.R_OK):
            raise ValueError(f"{name}: cannot read {value!r}")
    return params
