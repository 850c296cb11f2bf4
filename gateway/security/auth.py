"""Who is connecting: JWT bearer tokens verified with PyJWT before the `101`, and the
`Principal` (user, expiry, room permissions) they yield.

Role: `Authenticator.authenticate(request)` -> Principal, or `HandshakeRejected` carrying
the RFC 6750 status and `WWW-Authenticate` challenge; `Authenticator.refresh()` checks a
replacement token for a live connection. No sockets, no rooms: this module imports the
standard library, PyJWT/cryptography and `gateway.errors` only -- never connection, server,
rooms or session.

Security rules enforced here (RFC 8725, JWT best current practice):
- the accepted algorithms are pinned by configuration, never taken from the token
  (section 3.1): `alg: none` is never accepted, and a key is bound to its algorithm family,
  so an HS256 token "signed" with the RS256 public key as an HMAC secret is refused
  (the algorithm-confusion attack, section 2.1);
- HMAC secrets must be at least 256 bits (RFC 7518 section 3.2);
- `exp` and `sub` are required; `iss`/`aud` are checked when configured, and a token that
  carries an `aud` is refused when this gateway has no audience (RFC 7519 section 4.1.3);
- tokens never reach a log line or an error message: reasons are fixed strings.

Claim defaults (documented in docs/security.md):
- `rooms` absent -> the configured `default_rooms` (default `*`: any room);
- `publish` absent -> the token's `rooms` patterns when it has a `rooms` claim, else the
  configured `default_publish` (default `*`). A token limited to some rooms therefore never
  gains the right to publish elsewhere by omission.
- `presence` absent -> the token's join patterns: whoever may join a room may see who is in
  it (`{"op":"presence"}` / `presence_stats`, where the room's rule enables presence). A
  `presence` claim (patterns, possibly `[]`) narrows or widens that, e.g. a lobby page that
  lists a room's members without joining it.
"""
from __future__ import annotations

import fnmatch
import functools
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa

from gateway.errors import ConfigError, HandshakeRejected

REALM = "ws-gateway"
MAX_TOKEN_BYTES = 8192
MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 256
MAX_SUB_LENGTH = 256

_HMAC_ALGS = ("HS256", "HS384", "HS512")
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}
_OKP_ALGS = ("EdDSA",)
# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class TokenRejected(Exception):
    """A token was refused. `error` is the RFC 6750 error code, `reason` a fixed one-liner."""

    def __init__(self, reason: str, error: str = "invalid_token", status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.status = status


# -- permissions ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """One compiled test for a set of glob patterns (shared by every principal with the same set)."""
    if not patterns:
        return lambda room: False
    if "*" in patterns:
        return lambda room: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    match = regex.match
    return lambda room: match(room) is not None


@dataclass(slots=True, eq=False)
class Principal:
    """The authenticated user of a connection.

    `rooms` / `publish` are glob patterns (fnmatch: `*`, `?`, `[abc]`; `*` also crosses
    `:` and `/`). `expires_at` is the token's `exp` (Unix seconds). `claims` keeps the
    verified payload for applications; it is never logged.
    """

    user: str
    expires_at: float | None = None
    rooms: tuple[str, ...] = ("*",)
    publish: tuple[str, ...] = ("*",)
    claims: dict = field(default_factory=dict, repr=False)
    presence: tuple[str, ...] | None = None      # None: the join patterns (see the module docstring)
    _can_join: Callable = field(default=None, repr=False)
    _can_publish: Callable = field(default=None, repr=False)
    _can_presence: Callable = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.rooms = tuple(self.rooms)
        self.publish = tuple(self.publish)
        self._can_join = _matcher(self.rooms)
        self._can_publish = _matcher(self.publish)
        self._can_presence = self._can_join if self.presence is None else _matcher(tuple(self.presence))

    def can_join(self, room: str) -> bool:
        return self._can_join(room)

    def can_publish(self, room: str) -> bool:
        return self._can_publish(room)

    def can_see_presence(self, room: str) -> bool:
        return self._can_presence(room)

    @property
    def grants_anything(self) -> bool:
        return bool(self.rooms or self.publish)

    def update_from(self, other: "Principal") -> None:
        """Take a refreshed token's expiry and permissions, in place (the session holds this object)."""
        self.expires_at = other.expires_at
        self.rooms, self.publish, self.claims = other.rooms, other.publish, other.claims
        self.presence = other.presence
        self._can_join, self._can_publish = other._can_join, other._can_publish
        self._can_presence = other._can_presence


# -- key material -----------------------------------------------------------------------------

def _algorithms_for_public_key(key) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError(f"jwt_public_key_file: RSA key of {key.key_size} bits; at least 2048 are required")
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(key.curve.name)
        if alg is None:
            raise ConfigError(f"jwt_public_key_file: unsupported elliptic curve {key.curve.name}")
        return (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return _OKP_ALGS
    raise ConfigError("jwt_public_key_file: unsupported public key type")


def load_public_key(pem: bytes, source: str = "jwt_public_key_file"):
    """Load a PEM public key; refuse a private key (the gateway only ever needs to verify)."""
    if b"PRIVATE KEY" in pem:
        raise ConfigError(f"{source}: contains a PRIVATE key; give the gateway the public key only")
    try:
        if b"CERTIFICATE" in pem:
            from cryptography import x509
            return x509.load_pem_x509_certificate(pem).public_key()
        return serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ConfigError(f"{source}: not a PEM public key ({exc})") from None


# -- the authenticator ------------------------------------------------------------------------

class Authenticator:
    """Verifies bearer JWTs against pinned algorithms and keys; see the module docstring."""

    def __init__(self, *, secret: bytes | str | None = None, public_key_pem: bytes | None = None,
                 algorithms: Iterable[str] = (), issuer: str = "", audience: Iterable[str] = (),
                 leeway: float = 0.0, cookie: str = "", default_rooms: Iterable[str] = ("*",),
                 default_publish: Iterable[str] = ("*",), clock: Callable[[], float] = time.time) -> None:
        keys: dict[str, object] = {}
        if secret:
            secret = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(secret) < 32:
                raise ConfigError("jwt_secret: must be at least 32 bytes (256 bits) for HS256, RFC 7518 section 3.2")
            for alg in _HMAC_ALGS:
                keys[alg] = secret
        public_algs: tuple[str, ...] = ()
        if public_key_pem:
            public_key = load_public_key(public_key_pem)
            public_algs = _algorithms_for_public_key(public_key)
            for alg in public_algs:
                keys[alg] = public_key
        if not keys:
            raise ConfigError("auth: configure jwt_secret / jwt_secret_file or jwt_public_key_file")
        wanted = [a.strip() for a in algorithms if a.strip()]
        if not wanted:
            # Default pin: the strongest common choice for each configured key.
            wanted = (["HS256"] if secret else []) + ([public_algs[0]] if public_algs else [])
        for alg in wanted:
            if alg.lower() == "none":
                raise ConfigError("jwt_algorithms: 'none' disables signatures and is never accepted (RFC 8725 section 3.1)")
            if alg not in keys:
                raise ConfigError(f"jwt_algorithms: {alg!r} has no matching key "
                                  f"(HS* need jwt_secret; RS*/PS*/ES*/EdDSA need a matching jwt_public_key_file)")
        # Each accepted algorithm maps to exactly the key of its own family.
        self._keys = {alg: keys[alg] for alg in wanted}
        self.algorithms = tuple(wanted)
        self.issuer = issuer or None
        self.audience = [a for a in audience if a] or None
        self.leeway = float(leeway)
        self.cookie = cookie
        self.default_rooms = tuple(default_rooms)
        self.default_publish = tuple(default_publish)
        self.clock = clock
        required = ["exp", "sub"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        self._options = {"require": required, "verify_aud": True}

    # -- extracting the token (RFC 6750 section 2) ---------------------------------------

    def token_from(self, request) -> str | None:
        """The bearer token of a request, or None; TokenRejected(400) for a malformed request.

        Header (section 2.1), then the `token` query parameter (section 2.3: browsers cannot
        set headers on a WebSocket request), then the configured cookie. Sending it by more
        than one method is an error (section 2: "MUST NOT use more than one method").
        """
        found = []
        authorization = request.header("authorization")
        if authorization:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() != "bearer":   # auth-scheme is case-insensitive (RFC 9110 section 11.1)
                raise TokenRejected("Authorization header must use the Bearer scheme", "invalid_request", 400)
            found.append(credentials.strip())
        if "token=" in request.query:
            values = request.query_params().get("token", [])
            if len(values) > 1:
                raise TokenRejected("more than one token query parameter", "invalid_request", 400)
            if values:
                found.append(values[0])
        if len(found) > 1:
            raise TokenRejected("token sent by more than one method (header and query)", "invalid_request", 400)
        if not found and self.cookie:
            value = _cookie(request.header("cookie"), self.cookie)
            if value:
                found.append(value)
        if not found:
            return None
        token = found[0]
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected("token too long", "invalid_request", 400)
        if not _B64TOKEN.fullmatch(token):
            raise TokenRejected("malformed token")
        return token

    def authenticate(self, request) -> Principal:
        """Principal for an upgrade request, or HandshakeRejected(401/400) with the challenge."""
        try:
            token = self.token_from(request)
            if token is None:
                # Section 3.1: a request without credentials gets the bare challenge, no error code.
                raise HandshakeRejected(401, "authentication required: send a bearer token "
                                             "(Authorization header or ?token=)", {"WWW-Authenticate": self.challenge()})
            return self.verify(token)
        except TokenRejected as exc:
            raise HandshakeRejected(exc.status, exc.reason, {"WWW-Authenticate": self.challenge(exc)}) from None

    def challenge(self, exc: TokenRejected | None = None) -> str:
        """The WWW-Authenticate value (RFC 6750 section 3); reasons are fixed, quote-free text."""
        if exc is None:
            return f'Bearer realm="{REALM}"'
        return f'Bearer realm="{REALM}", error="{exc.error}", error_description="{exc.reason}"'

    # -- verifying -------------------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        alg = header.get("alg")
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None:
            shown = alg if isinstance(alg, str) and alg.isalnum() and len(alg) <= 10 else "?"
            raise TokenRejected(f"algorithm {shown} not accepted (accepted: {', '.join(self.algorithms)})")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], issuer=self.issuer, audience=self.audience,
                                leeway=self.leeway, options=self._options)
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid (nbf)") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(f"token lacks the required {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("signature verification failed") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("algorithm not accepted") from None
        except jwt.InvalidIssuedAtError:
            raise TokenRejected("token iat claim is invalid") from None
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        return self._principal(claims)

    def _principal(self, claims: dict) -> Principal:
        sub = claims.get("sub")
        if (not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in sub)):
            # sub is shown in logs and presence: no control characters (log injection).
            raise TokenRejected("sub claim must be a short printable string")
        rooms = _patterns(claims, "rooms")
        publish = _patterns(claims, "publish")
        if rooms is None:
            rooms = self.default_rooms
        if publish is None:
            publish = rooms if "rooms" in claims else self.default_publish
        presence = _patterns(claims, "presence")
        return Principal(user=sub, expires_at=float(claims["exp"]), rooms=rooms, publish=publish, claims=claims,
                         presence=presence)

    def refresh(self, current: Principal, token: str) -> Principal:
        """Verify a replacement token for a live connection: same `sub`, later `exp`.

        Returns the new Principal; the caller applies it with `current.update_from(new)`.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES or not _B64TOKEN.fullmatch(token):
            raise TokenRejected("malformed token")
        new = self.verify(token)
        if new.user != current.user:
            raise TokenRejected("refresh token is for a different user")
        if current.expires_at is not None and new.expires_at <= current.expires_at:
            raise TokenRejected("refresh token does not extend the current expiry")
        return new


def _patterns(claims: dict, name: str) -> tuple[str, ...] | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_PATTERNS
            or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_LENGTH for p in value)):
        raise TokenRejected(f"{name} claim must be a list of room patterns")
    return tuple(value)


def _cookie(header: str, name: str) -> str | None:
    """One cookie's value from a Cookie header (RFC 6265 section 5.4 syntax: `a=b; c=d`)."""
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def from_config(config) -> Authenticator | None:
    """The Authenticator for a Config, or None when no key is configured (open mode).

    Reads `jwt_secret` (flag / $WS_GATEWAY_JWT_SECRET / TOML), or `jwt_secret_file`, and
    `jwt_public_key_file`; raises ConfigError naming the setting on any problem with the key
    material. The settings themselves (e.g. jwt_secret and jwt_secret_file are mutually
    exclusive) were checked once, when the Config was loaded (config.py).
    """
    secret = getattr(config, "jwt_secret", "") or ""
    secret_file = getattr(config, "jwt_secret_file", "") or ""
    if secret_file and not secret:
        try:
            with open(secret_file, "rb") as fh:
                secret = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"jwt_secret_file: cannot read {secret_file!r}: {exc.strerror}") from None
    pem = None
    key_file = getattr(config, "jwt_public_key_file", "") or ""
    if key_file:
        try:
            with open(key_file, "rb") as fh:
                pem = fh.read()
        except OSError as exc:
            raise ConfigError(f"jwt_public_key_file: cannot read {key_file!r}: {exc.strerror}") from None
    if not secret and not pem:
        return None
    return Authenticator(
        secret=secret or None, public_key_pem=pem,
        algorithms=_split(getattr(config, "jwt_algorithms", "")),
        issuer=getattr(config, "jwt_issuer", ""),
        audience=_split(getattr(config, "jwt_audience", "")),
        leeway=getattr(config, "jwt_leeway", 0.0),
        cookie=getattr(config, "token_cookie", ""),
        default_rooms=_split(getattr(config, "default_rooms", "*")),
        default_publish=_split(getattr(config, "default_publish", "*")),
    )


def _split(value) -> tuple[str, ...]:
    """A list setting given as a TOML array or as comma-separated text (flag / environment)."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value or "").split(",") if v.strip())
