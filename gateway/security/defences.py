"""Wires authentication and the abuse limits into a Gateway; the policy lives here, the
mechanisms in auth.py and limits.py.

Before the `101` (an admission hook, cheapest check first so a flood costs little):
  1. Origin allow-list -> 403 (RFC 6455 section 10.2, cross-site WebSocket hijacking);
  2. client IP (X-Forwarded-For / X-Real-IP only from trusted proxies) and the per-IP
     concurrent connection cap -> 429 with Retry-After;
  3. the bearer token -> 401 with `WWW-Authenticate` (RFC 6750 section 3), 400 for a
     malformed request, 403 when the token grants no room at all;
  4. the per-connection inbound token bucket is attached (not for `rate_limit_exempt`
     endpoints such as /echo).
After it: per-IP counts follow open/close; token expiry is checked by the Gateway's periodic
sweep through a one-second wheel (no timer per connection) and closes with 4001 unless
`{"op":"refresh"}` extended it (`refresh()`, exposed as `gateway.refresh_token`); a
connection over its message rate gets the endpoint's error reply, then close 4002.

Counters are plain integers in `Defences.stats`, exported by metrics.py as `limits`.
Imports auth, limits, errors and the standard library only; never connection or server
(the Gateway is passed in and used through its hook lists).
"""
from __future__ import annotations

import collections
import logging
import math
import time

from gateway.security import auth as auth_mod
from gateway.security.revocation import RevocationList
from gateway.errors import CLOSE_REASONS, ConfigError, GatewayCloseCode, HandshakeRejected
from gateway.security.limits import ClientAddress, ConnectionCounter, OriginPolicy, TokenBucket, ip_key

log = logging.getLogger("gateway.security.defences")

_AUTH_REASON_KEYS = (("expired", "expired"), ("lacks", "claims"), ("algorithm", "algorithm"),
                     ("signature", "signature"), ("audience", "audience"), ("issuer", "issuer"))


class DefenceStats:
    """Counters read by metrics at scrape time (`ws_gateway_limits_*_total`, declared in gateway/ops/metrics.py)."""

    def __init__(self) -> None:
        self.origin_rejected = 0       # 403: Origin not allowed
        self.per_ip_rejected = 0       # 429: too many connections from one client IP
        self.forbidden = 0             # 403: valid token that grants nothing here
        self.rate_limited = 0          # connections closed 4002
        self.token_expired = 0         # connections closed 4001
        self.refreshed = 0             # accepted {"op":"refresh"}
        self.refresh_rejected = 0
        self.auth_rejected: collections.Counter = collections.Counter()   # 401/400 by reason
        self.revoked = 0               # 401: token revoked (handshake) or refresh refused for it


def _list(value) -> tuple[str, ...]:
    return auth_mod._split(value)


def build_authenticator(config) -> auth_mod.Authenticator | None:
    """From a Config; ConfigError on a bad key/setting (run at start-up, before forking)."""
    return auth_mod.from_config(config)


class Defences:
    def __init__(self, gateway, config, authenticator: auth_mod.Authenticator | None = None) -> None:
        self.gateway = gateway
        self.auth = authenticator if authenticator is not None else build_authenticator(config)
        # A connect proxy (connect_proxy_url) admits requests that carry no token.
        self.proxied = bool(getattr(config, "connect_proxy_url", ""))
        self.origins = OriginPolicy(_list(getattr(config, "allowed_origins", ())),
                                    same_origin_default=_cookie_auth(self.auth, config))
        self.addresses = ClientAddress(_list(getattr(config, "trusted_proxies", ())))
        self.per_ip = ConnectionCounter(int(getattr(config, "max_connections_per_ip", 0) or 0))
        self.rate = float(getattr(config, "rate_limit", 0) or 0)
        self.burst = float(getattr(config, "rate_limit_burst", 0) or 0) or max(1.0, self.rate)
        if self.rate < 0 or self.burst < 1:
            raise ConfigError("rate_limit must be >= 0 and rate_limit_burst >= 1")
        self.stats = DefenceStats()
        # Revoked tokens (revocation.py): filled by the server API / control channel; while
        # empty the handshake pays one truth test.
        self.revocations = RevocationList()
        self._leeway = self.auth.leeway if self.auth else 0.0
        self._wheel: dict[int, set] = {}          # expiry second -> connections
        self._wheel_next = int(time.time())
        self._warned_forwarded = False
        # One bound method for every connection's TokenBucket, not one object per connection.
        self._on_rate_limited = self.rate_limited

    def install(self) -> "Defences":
        gw = self.gateway
        gw.admission_hooks.append(self.admit)
        gw.open_hooks.append(self.on_open)
        gw.close_hooks.append(self.on_close)
        gw.sweep_hooks.append(self.sweep)          # an empty wheel costs one comparison a second
        gw.refresh_token = self.refresh if self.auth is not None else None
        on_reload = getattr(gw, "on_reload", None)
        if on_reload is not None:
            on_reload.append(self.reload)
        gw.limits = self
        gw.metric_sources["limits"] = self.stats   # ws_gateway_limits_* (gateway/ops/metrics.py)
        return self

    def reload(self, _old, new) -> None:
        """SIGHUP: rebuild keys (files re-read: key rotation), origins, proxies and limits.

        New handshakes use them at once; open connections keep their principal and expiry.
        A bad new setting keeps the running ones (and says why).
        """
        try:
            authenticator = build_authenticator(new)
            origins = OriginPolicy(_list(new.allowed_origins), _cookie_auth(authenticator, new))
            addresses = ClientAddress(_list(new.trusted_proxies))
        except ConfigError as exc:
            log.error("SIGHUP: auth/defence settings rejected, keeping the running ones",
                      extra={"event": "reload_error", "error": str(exc)})
            return
        if (authenticator is None) != (self.auth is None):
            log.warning("SIGHUP: authentication turned %s for new connections", "on" if authenticator else "OFF",
                        extra={"event": "auth_reload"})
        self.auth, self.origins, self.addresses = authenticator, origins, addresses
        self.gateway.refresh_token = self.refresh if authenticator is not None else None
        self.per_ip.limit = int(new.max_connections_per_ip)
        self.rate = float(new.rate_limit)
        self.burst = float(new.rate_limit_burst) or max(1.0, self.rate)
        leeway = authenticator.leeway if authenticator else 0.0
        if leeway != self._leeway:
            # Slots depend on the leeway: re-file every waiting connection (once per reload).
            waiting = [conn for bucket in self._wheel.values() for conn in bucket]
            self._leeway, self._wheel = leeway, {}
            for conn in waiting:
                self._wheel.setdefault(self._slot(conn.principal.expires_at), set()).add(conn)
        log.info("auth and defences reloaded", extra={"event": "defences_reload", "auth": authenticator is not None})

    # -- before the 101 -------------------------------------------------------------------

    def admit(self, conn, request) -> None:
        stats = self.stats
        reason = self.origins.check(request.headers.get("origin"), request.header("host"))
        if reason is not None:
            stats.origin_rejected += 1
            raise HandshakeRejected(403, reason)

        forwarded, real_ip = request.header("x-forwarded-for"), request.header("x-real-ip")
        ip = self.addresses.resolve(conn.peer, forwarded, real_ip)
        if (forwarded or real_ip) and not self.addresses.networks and not self._warned_forwarded:
            # Likely a proxy we were not told about: every client would share its address.
            self._warned_forwarded = True
            log.warning("X-Forwarded-For/X-Real-IP ignored: the peer is not a trusted proxy; set "
                        "trusted_proxies if a proxy you run sits in front", extra={"event": "untrusted_forwarded",
                                                                                    "peer": conn.peer})
        conn.client_ip = ip
        if self.per_ip.limit and self.per_ip.full(ip_key(ip)):
            stats.per_ip_rejected += 1
            raise HandshakeRejected(429, f"too many connections from {ip} (limit {self.per_ip.limit})",
                                    {"Retry-After": "10"})

        if self.auth is not None:
            try:
                principal = self.auth.authenticate(request)
            except HandshakeRejected as exc:
                reason = _reason_key(exc)
                if reason == "missing" and self.proxied:
                    # No token at all: the connect proxy decides (api/proxy.py), e.g. by cookie.
                    principal = None
                else:
                    stats.auth_rejected[reason] += 1
                    raise
        else:
            principal = None
        if principal is not None:
            if not principal.grants_anything:
                stats.forbidden += 1
                raise HandshakeRejected(403, "token grants no rooms (empty rooms and publish claims)")
            if self.revocations:
                reason = self.revocations.check(principal)
                if reason is not None:
                    stats.revoked += 1
                    error = auth_mod.TokenRejected(reason)
                    raise HandshakeRejected(401, reason, {"WWW-Authenticate": self.auth.challenge(error)})
            conn.principal = principal

        if self.rate > 0:
            endpoint = self.gateway.endpoints.get(request.path)
            if not getattr(endpoint, "rate_limit_exempt", False):
                conn.limiter = TokenBucket(self.rate, self.burst, self._on_rate_limited)
        return None

    # -- open connections -----------------------------------------------------------------

    def on_open(self, conn) -> None:
        # Counted even while the cap is off, so a cap turned on by SIGHUP sees the truth.
        if conn.client_ip:
            self.per_ip.add(ip_key(conn.client_ip))
        principal = conn.principal
        if principal is not None and principal.expires_at is not None:
            self._wheel.setdefault(self._slot(principal.expires_at), set()).add(conn)

    def on_close(self, conn) -> None:
        if conn.client_ip:
            self.per_ip.remove(ip_key(conn.client_ip))
        principal = conn.principal
        if principal is not None and principal.expires_at is not None:
            bucket = self._wheel.get(self._slot(principal.expires_at))
            if bucket is not None:
                bucket.discard(conn)

    def _slot(self, expires_at: float) -> int:
        # The first whole second at which the token is past exp + leeway (what verify() allows).
        return math.floor(expires_at + self._leeway) + 1

    def sweep(self, _now: float = 0.0) -> None:
        """Close connections whose token expired; called by the Gateway sweep (<= 1 s apart)."""
        now = int(time.time())
        if now < self._wheel_next:
            return
        if now - self._wheel_next > 600:
            # Clock jumped or the loop stalled: visit the occupied slots instead of every second.
            due = [slot for slot in self._wheel if slot <= now]
        else:
            due = range(self._wheel_next, now + 1)
        self._wheel_next = now + 1
        for slot in due:
            for conn in self._wheel.pop(slot, ()):
                self._expire(conn)

    def _expire(self, conn) -> None:
        self.stats.token_expired += 1
        log.info("token expired", extra={"event": "token_expired", "conn": conn.id, "peer": conn.peer,
                                         "user": conn.user})
        conn.close(int(GatewayCloseCode.TOKEN_EXPIRED), CLOSE_REASONS[GatewayCloseCode.TOKEN_EXPIRED])

    def refresh(self, conn, token) -> auth_mod.Principal:
        """`{"op":"refresh","token":T}`: same sub, later exp -> the connection lives on.

        Raises auth.TokenRejected (its `reason` is safe to send back and to log).
        """
        current = conn.principal
        if self.auth is None or current is None:
            raise auth_mod.TokenRejected("authentication is not enabled on this gateway")
        try:
            new = self.auth.refresh(current, token)
        except auth_mod.TokenRejected as exc:
            self.stats.refresh_rejected += 1
            log.info("token refresh rejected", extra={"event": "refresh_rejected", "conn": conn.id,
                                                      "user": conn.user, "reason": exc.reason})
            raise
        if not new.grants_anything:
            self.stats.refresh_rejected += 1
            raise auth_mod.TokenRejected("token grants no rooms")
        if self.revocations:
            reason = self.revocations.check(new)
            if reason is not None:
                self.stats.refresh_rejected += 1
                self.stats.revoked += 1
                log.info("token refresh rejected", extra={"event": "refresh_rejected", "conn": conn.id,
                                                          "user": conn.user, "reason": reason})
                raise auth_mod.TokenRejected(reason)
        old_slot = self._slot(current.expires_at) if current.expires_at is not None else None
        if old_slot is not None and old_slot in self._wheel:
            self._wheel[old_slot].discard(conn)
        current.update_from(new)
        self._wheel.setdefault(self._slot(current.expires_at), set()).add(conn)
        self.stats.refreshed += 1
        log.info("token refreshed", extra={"event": "refresh", "conn": conn.id, "user": conn.user,
                                           "expires_at": int(current.expires_at)})
        return current

    # -- inbound message rate -------------------------------------------------------------

    def rate_limited(self, conn, messages, allowed: int) -> None:
        """The connection's token bucket ran dry during a read (called by Connection)."""
        endpoint = conn.endpoint
        if allowed > 0:
            endpoint.on_messages(conn, messages[:allowed])
        self.stats.rate_limited += 1
        log.info("message rate limit exceeded", extra={"event": "rate_limited", "conn": conn.id, "peer": conn.peer,
                                                       "user": conn.user, "rate": self.rate, "burst": self.burst})
        notify = getattr(endpoint, "on_rate_limited", None)
        if notify is not None:
            try:
                notify(conn)   # e.g. the rooms session's {"op":"error","code":"rate_limited"}
            except Exception:
                log.exception("endpoint on_rate_limited failed", extra={"conn": conn.id})
        conn.limiter = None    # the close below ends it; later reads are discarded by the protocol
        conn.close(int(GatewayCloseCode.RATE_LIMITED), CLOSE_REASONS[GatewayCloseCode.RATE_LIMITED])


def _cookie_auth(authenticator, config) -> bool:
    """Does a browser's cookie alone authenticate? (a token cookie, or the connect proxy fed the
    Cookie header). Then an empty Origin allow-list means same-origin only: RFC 6455 section
    10.2, cross-site WebSocket hijacking rides on the victim's cookies."""
    if authenticator is not None and authenticator.cookie:
        return True
    return bool(getattr(config, "connect_proxy_url", "")) and "cookie" in {
        h.lower() for h in _list(getattr(config, "proxy_headers", ()))}


def _reason_key(exc: HandshakeRejected) -> str:
    if exc.status == 400:
        return "bad_request"
    if "error=" not in exc.headers.get("WWW-Authenticate", ""):
        return "missing"
    reason = exc.reason
    for needle, key in _AUTH_REASON_KEYS:
        if needle in reason:
            return key
    return "invalid"


def install(gateway, config, authenticator=None) -> Defences:
    """Attach the defences to `gateway`; log loudly when it runs without authentication."""
    defences = Defences(gateway, config, authenticator).install()
    if defences.auth is None and defences.proxied:
        log.info("authentication by the connect proxy", extra={"event": "auth", "proxy": True})
    elif defences.auth is None:
        log.warning("AUTHENTICATION IS OFF: anyone who can reach this port may connect, join any room and "
                    "publish. Configure jwt_secret_file or jwt_public_key_file (see docs/security.md).",
                    extra={"event": "open_mode"})
    else:
        log.info("authentication on", extra={"event": "auth", "algorithms": list(defences.auth.algorithms),
                                             "issuer": defences.auth.issuer or "", "cookie": defences.auth.cookie})
    return defences


def preflight(config) -> None:
    """Build every piece once from `config` so a bad key file, origin or proxy entry stops
    start-up with a ConfigError (before workers fork), not the first client. Every piece is
    tried: the ConfigError lists each problem found, as config loading does."""
    errors: list[str] = []
    authenticator = None
    try:
        authenticator = build_authenticator(config)
    except ConfigError as exc:
        errors.extend(exc.errors)
    for build in (lambda: OriginPolicy(_list(config.allowed_origins), _cookie_auth(authenticator, config)),
                  lambda: ClientAddress(_list(config.trusted_proxies))):
        try:
            build()
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError("; ".join(errors), errors)
