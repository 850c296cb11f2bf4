"""Abuse limits as small, socket-free building blocks: Origin allow-list, client IP behind
trusted proxies, per-IP connection counts, and the per-connection message token bucket.

Each piece is a plain object with one job and is tested without sockets; `defences.py`
wires them into the Gateway. Leaf module: imports only the standard library and `errors`
(never connection, server, auth or rooms).
"""
from __future__ import annotations

import ipaddress
import time
from typing import Iterable

from gateway.errors import ConfigError

_monotonic = time.monotonic

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _port_digits(text: str) -> bool:
    # ASCII digits only: str.isdigit() also takes '²', which int() then refuses (issue 12).
    return text.isascii() and text.isdigit() and len(text) <= 5


# -- Origin ---------------------------------------------------------------------------------

def _split_origin(origin: str) -> tuple[str, str, int | None] | None:
    """'https://Chat.Example.com:8443' -> ('https', 'chat.example.com', 8443); None if malformed.

    RFC 6454 section 6.1: an origin is scheme "://" host [ ":" port ], with no path; the
    default port is implied. Anything else (a path, credentials, spaces) is not an origin.
    """
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or not scheme or not rest or any(c in rest for c in "/?#@ \t\\"):
        return None
    host, port = rest, None
    if rest.startswith("["):                       # IPv6 literal
        end = rest.find("]")
        if end < 0:
            return None
        host, tail = rest[:end + 1], rest[end + 1:]
        if tail:
            if not tail.startswith(":") or not _port_digits(tail[1:]):
                return None
            port = int(tail[1:])
    elif ":" in rest:
        host, _, port_text = rest.rpartition(":")
        if not _port_digits(port_text):
            return None
        port = int(port_text)
    if not host or (port is not None and not 0 < port < 65536):
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return scheme, host, port


class OriginPolicy:
    """Decide whether a browser page from `Origin` may open a WebSocket here.

    RFC 6455 section 10.2: the server must check Origin to stop scripts on other sites from
    using a visitor's ambient credentials (cookies) -- cross-site WebSocket hijacking.
    Entries: `*` (anything), `null` (sandboxed/file pages; only if listed), an exact origin
    `https://app.example.com[:port]`, or a wildcard subdomain `https://*.example.com`, which
    matches `a.example.com` and `a.b.example.com` but neither `example.com` nor
    `badexample.com`. A port-less entry means the scheme's default port.

    An empty list allows every origin unless `same_origin_default` is set (cookie auth), in
    which case the Origin's host:port must equal the request's Host. Requests without an
    Origin header (non-browser clients, which can forge it anyway) are allowed.
    """

    __slots__ = ("any", "exact", "wildcards", "allow_null", "same_origin_default")

    def __init__(self, allowed: Iterable[str] = (), same_origin_default: bool = False) -> None:
        self.any = False
        self.allow_null = False
        self.exact: set[tuple] = set()
        self.wildcards: list[tuple[str, str, int | None]] = []
        self.same_origin_default = same_origin_default
        for entry in allowed:
            entry = entry.strip()
            if not entry:
                continue
            if entry == "*":
                self.any = True
                continue
            if entry.lower() == "null":
                self.allow_null = True
                continue
            parts = _split_origin(entry)
            if parts is None:
                raise ConfigError(f"allowed_origins: {entry!r} is not an origin like https://app.example.com "
                                  "or https://*.example.com")
            scheme, host, port = parts
            if host.startswith("*."):
                if len(host) < 3 or "*" in host[2:]:
                    raise ConfigError(f"allowed_origins: {entry!r}: only a leading '*.' wildcard is allowed")
                self.wildcards.append((scheme, host[1:], port))   # keep the dot: '.example.com'
            elif "*" in host:
                raise ConfigError(f"allowed_origins: {entry!r}: only a leading '*.' wildcard is allowed")
            else:
                self.exact.add(parts)

    @property
    def enabled(self) -> bool:
        return not self.any and bool(self.exact or self.wildcards or self.allow_null or self.same_origin_default)

    def check(self, origin: str | None, host: str = "") -> str | None:
        """None when allowed, else the one-line reason for the 403."""
        if origin is None or self.any:
            return None
        if origin.strip().lower() == "null":
            return None if self.allow_null else "Origin 'null' is not allowed"
        parts = _split_origin(origin)
        if parts is None:
            return "malformed Origin header"
        if self.exact or self.wildcards or self.allow_null:
            if parts in self.exact:
                return None
            scheme, hostname, port = parts
            for w_scheme, suffix, w_port in self.wildcards:
                if scheme == w_scheme and port == w_port and hostname.endswith(suffix) and len(hostname) > len(suffix):
                    return None
            return f"Origin {_printable(origin)} is not allowed"
        if self.same_origin_default:
            _, hostname, port = parts
            want = _split_origin(f"{parts[0]}://{host}") if host else None
            if want is None or (want[1], want[2]) != (hostname, port):
                return f"cross-origin request from {_printable(origin)} refused (same-origin only)"
        return None


def _printable(text: str, limit: int = 100) -> str:
    """Attacker-supplied text for a reason line: bounded, no control characters, no quotes."""
    return repr("".join(c if 0x20 <= ord(c) < 0x7F and c not in "\"\\" else "?" for c in text[:limit]))


# -- client address behind proxies ----------------------------------------------------------

def _parse_ip(text: str):
    text = text.strip()
    if text.startswith("["):                       # "[::1]:1234" or "[::1]"
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:                     # "1.2.3.4:5678"
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientAddress:
    """Which IP a request really comes from.

    X-Forwarded-For / X-Real-IP are client-controlled text unless a proxy we run wrote them,
    so they are read only when the TCP peer is a configured trusted proxy (address or CIDR).
    X-Forwarded-For is walked right to left, skipping trusted proxies: the first untrusted
    address is the client (entries further left were supplied by the client and are ignored).
    """

    __slots__ = ("networks",)

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.networks = []
        for entry in trusted_proxies:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(f"trusted_proxies: {entry!r} is not an IP address or CIDR network") from None

    def is_trusted(self, ip) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def resolve(self, peer: str, forwarded_for: str = "", real_ip: str = "") -> str:
        """The client IP as text; `peer` is Connection.peer, i.e. f"{ip}:{port}" (also for IPv6)."""
        host = peer.rpartition(":")[0] if ":" in peer else peer
        if not self.networks and host and not host.startswith("::ffff:"):
            return host            # the kernel's own text for the address: nothing to parse
        peer_ip = _parse_ip(host) if host.count(":") != 1 else _parse_ip(peer)
        if peer_ip is None:
            peer_ip = _parse_ip(peer)
        if peer_ip is None:
            return peer
        if not self.networks or not self.is_trusted(peer_ip):
            return str(peer_ip)
        if forwarded_for:
            hops = [h for h in forwarded_for.split(",") if h.strip()]
            client = peer_ip
            for hop in reversed(hops):
                ip = _parse_ip(hop)
                if ip is None:
                    break                       # garbage: keep the last address we could vouch for
                client = ip
                if not self.is_trusted(ip):
                    break
            return str(client)
        if real_ip:
            ip = _parse_ip(real_ip)
            if ip is not None:
                return str(ip)
        return str(peer_ip)


class OperatorOnly:
    """Who may read an operator route on the public port (/metrics): the same host or a proxy we run.

    Allowed: a client whose address (after `ClientAddress.resolve`, so X-Forwarded-For from a
    trusted proxy names the real client) is loopback or itself a trusted proxy. A request a
    trusted proxy forwards for an outside client is therefore refused even though the TCP
    peer is trusted; a request from the proxy host itself (a Prometheus beside nginx) is not.
    `public` turns the check off (the operator chose to expose it, e.g. behind a firewall).
    """

    __slots__ = ("addresses", "public")

    def __init__(self, trusted_proxies: Iterable[str] = (), public: bool = False) -> None:
        self.addresses = ClientAddress(trusted_proxies)
        self.public = public

    def allows(self, peer: str, forwarded_for: str = "", real_ip: str = "") -> bool:
        if self.public:
            return True
        ip = _parse_ip(self.addresses.resolve(peer, forwarded_for, real_ip))
        return ip is not None and (ip.is_loopback or self.addresses.is_trusted(ip))


def ip_key(ip_text: str) -> str:
    """The unit a per-IP limit counts: the address for IPv4, the /64 network for IPv6.

    One IPv6 subscriber usually owns a whole /64 (RFC 6177), so counting single v6
    addresses would let one host open 2**64 times the limit.
    """
    if ":" not in ip_text:
        return ip_text             # IPv4 (the common case): no parsing
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return ip_text
    if ip.version == 6:
        if ip.ipv4_mapped is not None:     # ::ffff:a.b.c.d from a dual-stack socket is IPv4
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return ip_text


class ConnectionCounter:
    """Open connections per client key; `limit` 0 means unlimited (only counted)."""

    __slots__ = ("limit", "counts")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def full(self, key: str) -> bool:
        return 0 < self.limit <= self.counts.get(key, 0)

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def remove(self, key: str) -> None:
        left = self.counts.get(key, 0) - 1
        if left > 0:
            self.counts[key] = left
        else:
            self.counts.pop(key, None)   # no entry per IP ever seen: memory stays bounded


# -- inbound message rate ------------------------------------------------------------------

class TokenBucket:
    """Per-connection inbound message budget: `rate` messages/s sustained, `burst` at once.

    Called once per socket read with the number of complete messages in it, so the cost is
    a clock read and a handful of float operations per read, whatever the batch size.
    `take(n)` returns how many of the n messages fit (n when all do); `exceeded` is the
    callback the connection calls when they do not (set by defences.py).
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "exceeded")

    def __init__(self, rate: float, burst: float, exceeded=None, now: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = _monotonic() if now is None else now
        self.exceeded = exceeded

    def take(self, n: int, clock=_monotonic) -> int:
        """How many of `n` messages arriving now fit (n when all do); the rest are refused.

        `clock` is bound at definition time (no global lookup per read); tests pass their own.
        """
        now = clock()
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= n:
            self.tokens = tokens - n
            return n
        allowed = int(tokens) if tokens > 0 else 0
        self.tokens = tokens - allowed
        return allowed
