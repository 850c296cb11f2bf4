"""Test keys and token makers for the auth tests (never used outside tests/)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "s3cret-for-tests-only-0123456789abcdef"   # >= 32 bytes (RFC 7518 section 3.2)
OTHER_SECRET = "another-secret-that-is-long-enough-0123456"

_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_ec = ec.generate_private_key(ec.SECP256R1())
RSA_PRIVATE = _rsa
EC_PRIVATE = _ec
RSA_PUBLIC_PEM = _rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
EC_PUBLIC_PEM = _ec.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
RSA_PRIVATE_PEM = _rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def claims(sub="alice", ttl=300.0, **extra) -> dict:
    doc = {"sub": sub, "exp": int(time.time() + ttl)}
    doc.update(extra)
    return {k: v for k, v in doc.items() if v is not None}


def hs256(secret=SECRET, **kw) -> str:
    return jwt.encode(claims(**kw), secret, algorithm="HS256")


def rs256(**kw) -> str:
    return jwt.encode(claims(**kw), RSA_PRIVATE, algorithm="RS256")


def es256(**kw) -> str:
    return jwt.encode(claims(**kw), EC_PRIVATE, algorithm="ES256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(**kw) -> str:
    """`alg: none` -- a token with no signature at all."""
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(claims(**kw)).encode())}."


def hs256_with_public_key(pem: bytes = RSA_PUBLIC_PEM, **kw) -> str:
    """The algorithm-confusion attack (RFC 8725 section 2.1): HMAC keyed with the RSA public key."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims(**kw)).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"
