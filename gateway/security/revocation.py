"""Token revocation: by `jti`, or by user with an `iat` cutoff, until the tokens would expire anyway.

A pure data structure (no I/O): every process keeps the whole list in memory, so checking a
token at the handshake or at `{"op":"refresh"}` is a dict lookup or two and costs nothing
while the list is empty. The API (`revoke_token`, `revoke_user`) stores an entry in the
presence backend (Redis: one hash, so a process starting later loads it) and announces it on
the control channel, so every process applies it at once (api/control.py); a process that
was cut off reloads the whole list when its control channel reconnects.

Entries:
    jti:<id>    -> ""          the token with this `jti` claim is refused
    user:<sub>  -> "<cutoff>"  tokens of <sub> issued at or before <cutoff> (Unix seconds,
                               the `iat` claim) are refused; a token without `iat` cannot
                               prove it is newer and is refused too
Each lives until its `until` (the revoked tokens' `exp`, or revocation_ttl), then is dropped.
Imports only the standard library.
"""
from __future__ import annotations

import time


class RevocationList:
    __slots__ = ("jti", "users", "revoked_seen")

    def __init__(self) -> None:
        self.jti: dict[str, float] = {}                    # jti -> until
        self.users: dict[str, tuple[float, float]] = {}    # sub -> (iat cutoff, until)
        self.revoked_seen = 0                              # tokens refused because of this list

    def __bool__(self) -> bool:
        return bool(self.jti or self.users)

    def __len__(self) -> int:
        return len(self.jti) + len(self.users)

    def apply(self, key: str, value: str, until: float) -> bool:
        """Add one entry ("jti:<id>" / "user:<sub>"); False if the key is not understood."""
        kind, _, name = key.partition(":")
        if not name:
            return False
        if kind == "jti":
            self.jti[name] = max(until, self.jti.get(name, 0.0))
            return True
        if kind == "user":
            try:
                cutoff = float(value)
            except ValueError:
                return False
            old = self.users.get(name)
            if old is not None:
                # Two revocations of one user: the later cutoff covers the earlier one.
                cutoff, until = max(cutoff, old[0]), max(until, old[1])
            self.users[name] = (cutoff, until)
            return True
        return False

    def replace(self, entries: dict) -> None:
        """The whole list as loaded from the backend: {key: (value, until)}."""
        self.jti.clear()
        self.users.clear()
        for key, (value, until) in entries.items():
            self.apply(key, value, until)

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for jti in [k for k, until in self.jti.items() if until <= now]:
            del self.jti[jti]
        for user in [k for k, (_, until) in self.users.items() if until <= now]:
            del self.users[user]

    def check(self, principal) -> str | None:
        """Why `principal`'s token is revoked, or None. Callers test `if revocations:` first."""
        claims = principal.claims
        now = time.time()
        jti = claims.get("jti")
        if isinstance(jti, str):
            until = self.jti.get(jti)
            if until is not None and until > now:
                self.revoked_seen += 1
                return "token revoked"
        entry = self.users.get(principal.user)
        if entry is not None and entry[1] > now:
            iat = claims.get("iat")
            if not isinstance(iat, (int, float)) or isinstance(iat, bool) or iat <= entry[0]:
                self.revoked_seen += 1
                return "token revoked (issued before the user's revocation)"
        return None
