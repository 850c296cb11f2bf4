"""gateway/security/auth.py without sockets: verification, every rejection reason, claims, refresh."""
import re
import time

import jwt
import pytest

from gateway.security.auth import Authenticator, Principal, TokenRejected, from_config
from gateway.errors import ConfigError, HandshakeRejected
from gateway.ws.handshake import parse_request
from tests import auth_tokens as t
from tests.helpers import make_config


def hs(**kw):
    return Authenticator(secret=t.SECRET, **kw)


def rs(**kw):
    return Authenticator(public_key_pem=t.RSA_PUBLIC_PEM, **kw)


def request(target="/ws", headers=""):
    return parse_request(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())


def rejected(auth, token) -> str:
    with pytest.raises(TokenRejected) as info:
        auth.verify(token)
    return info.value.reason


def test_valid_tokens_each_algorithm():
    assert hs().verify(t.hs256(sub="u1")).user == "u1"
    assert rs().verify(t.rs256(sub="u2")).user == "u2"
    ec = Authenticator(public_key_pem=t.EC_PUBLIC_PEM)
    assert ec.algorithms == ("ES256",)
    assert ec.verify(t.es256(sub="u3")).user == "u3"


@pytest.mark.parametrize("make, auth, reason", [
    (lambda: t.unsigned(), hs, "algorithm none not accepted"),
    (lambda: t.unsigned(), rs, "algorithm none not accepted"),
    # algorithm confusion: HS256 keyed with the RS256 public key must not verify
    (lambda: t.hs256_with_public_key(), rs, "algorithm HS256 not accepted"),
    (lambda: t.hs256(secret=t.OTHER_SECRET), hs, "signature verification failed"),
    (lambda: t.rs256(), hs, "algorithm RS256 not accepted"),
    (lambda: t.hs256(ttl=-60), hs, "token expired"),
    (lambda: t.hs256(nbf=int(time.time()) + 3600), hs, "token not yet valid (nbf)"),
    (lambda: jwt.encode({"exp": int(time.time()) + 60}, t.SECRET, algorithm="HS256"), hs,
     "token lacks the required sub claim"),
    (lambda: jwt.encode({"sub": "a"}, t.SECRET, algorithm="HS256"), hs, "token lacks the required exp claim"),
    (lambda: t.hs256(aud="someone-else"), hs, "token audience not accepted"),   # aud present, none configured
    (lambda: "not.a.jwt", hs, "malformed token"),
    (lambda: t.hs256(sub=""), hs, "sub claim must be a short printable string"),
    (lambda: t.hs256(sub="evil\nuser"), hs, "sub claim must be a short printable string"),
    (lambda: t.hs256(rooms="x" * 300), hs, "rooms claim must be a list of room patterns"),
    (lambda: t.hs256(publish=[1, 2]), hs, "publish claim must be a list of room patterns"),
])
def test_rejections_have_fixed_reasons(make, auth, reason):
    token = make()
    got = rejected(auth(), token)
    assert got.startswith(reason)
    assert token not in got


def test_both_keys_still_bind_each_algorithm_to_its_own_key():
    both = Authenticator(secret=t.SECRET, public_key_pem=t.RSA_PUBLIC_PEM)
    assert both.algorithms == ("HS256", "RS256")
    assert both.verify(t.hs256()).user == "alice"
    assert both.verify(t.rs256()).user == "alice"
    assert rejected(both, t.hs256_with_public_key()) == "signature verification failed"


def test_issuer_audience_leeway():
    auth = hs(issuer="https://idp", audience=["gw", "gw2"], leeway=30)
    assert auth.verify(t.hs256(iss="https://idp", aud="gw2")).user == "alice"
    assert auth.verify(t.hs256(iss="https://idp", aud=["x", "gw"], ttl=-10)).user == "alice"   # within leeway
    assert rejected(auth, t.hs256(iss="https://other", aud="gw")) == "token issuer not accepted"
    assert rejected(auth, t.hs256(iss="https://idp", aud="nope")) == "token audience not accepted"
    assert rejected(auth, t.hs256(aud="gw")) == "token lacks the required iss claim"
    assert rejected(auth, t.hs256(iss="https://idp", aud="gw", ttl=-60)) == "token expired"


def test_claim_defaults_and_patterns():
    auth = hs(default_rooms=("lobby", "public:*"), default_publish=("lobby",))
    p = auth.verify(t.hs256())                                    # no rooms, no publish claim
    assert (p.rooms, p.publish) == (("lobby", "public:*"), ("lobby",))
    assert p.can_join("public:news") and not p.can_join("private:x")
    assert p.can_publish("lobby") and not p.can_publish("public:news")
    p = auth.verify(t.hs256(rooms=["chat:*"]))                    # publish absent: follows rooms
    assert p.publish == ("chat:*",) and p.can_publish("chat:1") and not p.can_publish("lobby")
    p = auth.verify(t.hs256(rooms=["chat:*", "dm:alice:?"], publish=[]))
    assert p.can_join("dm:alice:1") and not p.can_join("dm:alice:12") and not p.can_publish("chat:1")
    assert p.grants_anything
    p = auth.verify(t.hs256(rooms=[], publish=[]))
    assert not p.grants_anything
    assert hs().verify(t.hs256()).can_join("anything/at:all")    # built-in default: *


def test_token_sources_and_precedence():
    auth = hs(cookie="gw_token")
    token = t.hs256(sub="bob")
    assert auth.authenticate(request(headers=f"Authorization: Bearer {token}\r\n")).user == "bob"
    assert auth.authenticate(request(headers=f"authorization: bearer {token}\r\n")).user == "bob"
    assert auth.authenticate(request(f"/ws?room=1&token={token}")).user == "bob"
    assert auth.authenticate(request(headers=f"Cookie: a=b; gw_token={token}; c=d\r\n")).user == "bob"
    assert hs().token_from(request(headers=f"Cookie: gw_token={token}\r\n")) is None   # cookie not configured


@pytest.mark.parametrize("target, headers, status, text", [
    ("/ws", "", 401, "authentication required"),
    ("/ws", "Authorization: Basic dXNlcjpwYXNz\r\n", 400, "Bearer scheme"),
    ("/ws?token=a.b.c&token=d.e.f", "", 400, "more than one token query parameter"),
    ("/ws?token=a.b.c", "Authorization: Bearer a.b.c\r\n", 400, "more than one method"),
    ("/ws?token=%22quoted%22", "", 401, "malformed token"),
    ("/ws", "Authorization: Bearer " + "a" * 9000 + "\r\n", 400, "token too long"),
], ids=["none", "basic", "two-query", "header-and-query", "not-b64token", "too-long"])
def test_authenticate_failures_carry_rfc6750_challenge(target, headers, status, text):
    with pytest.raises(HandshakeRejected) as info:
        hs().authenticate(request(target, headers))
    exc = info.value
    assert exc.status == status and text in exc.reason
    challenge = exc.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="ws-gateway"')
    if status == 401 and "required" in text:
        assert "error=" not in challenge          # RFC 6750 section 3.1: no error code without credentials
    else:
        assert 'error="invalid_' in challenge and f'error_description="{exc.reason}"' in challenge


def test_refresh_same_user_later_expiry():
    auth = hs()
    current = auth.verify(t.hs256(ttl=60, rooms=["a"]))
    new = auth.refresh(current, t.hs256(ttl=600, rooms=["a", "b"]))
    current.update_from(new)
    assert current.expires_at == new.expires_at and current.can_join("b")
    with pytest.raises(TokenRejected, match="different user"):
        auth.refresh(current, t.hs256(sub="mallory", ttl=900))
    with pytest.raises(TokenRejected, match="does not extend"):
        auth.refresh(current, t.hs256(ttl=30))
    with pytest.raises(TokenRejected, match="token expired"):
        auth.refresh(current, t.hs256(ttl=-100))
    with pytest.raises(TokenRejected, match="malformed"):
        auth.refresh(current, {"not": "a string"})


@pytest.mark.parametrize("kwargs, message", [
    (dict(secret="short"), "at least 32 bytes"),
    (dict(secret=t.SECRET, algorithms=["none"]), "never accepted"),
    (dict(secret=t.SECRET, algorithms=["RS256"]), "has no matching key"),
    (dict(public_key_pem=t.RSA_PUBLIC_PEM, algorithms=["HS256"]), "has no matching key"),
    (dict(public_key_pem=t.RSA_PRIVATE_PEM), "PRIVATE key"),
    (dict(public_key_pem=b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n"), "not a PEM public key"),
    (dict(), "configure jwt_secret"),
])
def test_bad_key_configuration_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Authenticator(**kwargs)


def test_from_config_files_and_open_mode(tmp_path):
    assert from_config(make_config()) is None                              # open mode
    secret_file = tmp_path / "secret"
    secret_file.write_text(t.SECRET + "\n")
    auth = from_config(make_config(jwt_secret_file=str(secret_file), jwt_audience="gw"))
    assert auth.verify(t.hs256(aud="gw")).user == "alice"
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(t.RSA_PUBLIC_PEM)
    auth = from_config(make_config(jwt_public_key_file=str(key_file), jwt_algorithms="RS256,PS256"))
    assert auth.algorithms == ("RS256", "PS256")
    with pytest.raises(ConfigError, match="cannot read"):
        from_config(make_config(jwt_public_key_file=str(tmp_path / "missing.pem")))


def test_principal_repr_hides_claims():
    p = Principal(user="u", claims={"secret": "x"})
    assert "secret" not in repr(p)


# -- arbitrary input never escapes as anything but a refusal ----------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_CHALLENGE = re.compile(r'Bearer realm="ws-gateway"(, error="invalid_(token|request)", '
                        r'error_description="[\x20\x21\x23-\x5B\x5D-\x7E]*")?')
_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\r\n"),
                       max_size=300)


@settings(max_examples=300, deadline=None)
@given(authorization=_header_text, query=_header_text, cookie=_header_text,
       segments=st.lists(st.binary(max_size=60), min_size=1, max_size=4))
def test_arbitrary_credentials_only_ever_refused(authorization, query, cookie, segments):
    import base64
    auth = hs(cookie="gw")
    forged = ".".join(base64.urlsafe_b64encode(s).rstrip(b"=").decode() for s in segments)
    for target, headers in ((f"/ws?{query.replace(' ', '+')}", ""),
                            ("/ws", f"Authorization: {authorization}\r\n"),
                            ("/ws", f"Cookie: {cookie}\r\n"),
                            (f"/ws?token={forged}", ""),
                            ("/ws", f"Authorization: Bearer {forged}\r\n")):
        try:
            request = parse_request(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode("latin-1"))
        except HandshakeRejected:
            continue            # the HTTP parser refused it first: also a clean refusal
        try:
            auth.authenticate(request)
        except HandshakeRejected as exc:
            assert exc.status in (400, 401)
            assert "\n" not in exc.reason
            # RFC 6750 section 3: error_description is limited to %x20-21 / %x23-5B / %x5D-7E
            assert _CHALLENGE.fullmatch(exc.headers["WWW-Authenticate"]), exc.headers
