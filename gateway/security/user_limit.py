"""`max_connections_per_user`: a cap on one user's (token `sub`) open connections, cluster-wide.

Before the `101` the connection asks the presence backend for a slot (the handshakes of one
loop pass together: one Redis pipeline; per handshake one Lua script
on the user's sorted set of connections scored by expiry, so two processes racing for the
last slot cannot both win); over the cap the upgrade is refused with 429 and Retry-After.
A slot is released when the connection closes, refreshed by the presence heartbeat, and a
SIGKILLed process's slots expire with `presence_ttl`. Anonymous connections are not capped
(`max_connections_per_ip` covers them).

If Redis cannot answer, the handshake is admitted (availability first) and counted in
`unchecked`: the cap is a fairness limit, not an authentication step.

Registered only when the cap is set (`gateway.async_admission`), so the handshake of a
gateway without it stays synchronous. Imports `errors` and the standard library only; the
backend is passed in.
"""
from __future__ import annotations

import asyncio
import logging

from gateway.errors import HandshakeRejected

log = logging.getLogger("gateway.security.user_limit")


class UserLimitStats:
    def __init__(self) -> None:
        self.rejected = 0       # 429: the user already had max_connections_per_user open
        self.unchecked = 0      # admitted without asking: the backend was unavailable


class UserConnectionLimit:
    def __init__(self, gateway, backend, limit: int, conn_key) -> None:
        self.gateway = gateway
        self.backend = backend
        self.limit = limit
        self.conn_key = conn_key          # conn -> "<node>.<id>" (the presence tracker's)
        self.held: dict = {}              # conn -> (user, conn key)
        self.stats = UserLimitStats()
        self._tasks: set = set()
        self._asking: list = []           # (user, conn key, future) of this loop pass

    def install(self) -> "UserConnectionLimit":
        gw = self.gateway
        gw.async_admission.append(self)
        gw.close_hooks.append(self.on_close)
        return self

    async def admit(self, conn) -> None:
        user = conn.user
        if not user:
            return
        key = self.conn_key(conn)
        # The handshakes of one loop pass ask together: one backend call (one Redis pipeline).
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._asking.append((user, key, fut))
        if len(self._asking) == 1:
            loop.call_soon(self._ask)
        outcome = await fut
        if isinstance(outcome, BaseException):   # BrokerUnavailable and friends: fail open
            self.stats.unchecked += 1
            log.warning("per-user connection cap not checked: backend unavailable",
                        extra={"event": "user_limit_unchecked", "user": user, "error": str(outcome)[:200]})
            return
        if not outcome:
            self.stats.rejected += 1
            raise HandshakeRejected(429, f"too many connections for this user (limit {self.limit})",
                                    {"Retry-After": "5"})
        self.held[conn] = (user, key)

    def _ask(self) -> None:
        asking, self._asking = self._asking, []
        task = asyncio.get_running_loop().create_task(self._ask_backend(asking))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_backend(self, asking: list) -> None:
        try:
            outcomes = await self.backend.acquire_user_slots([(user, key, self.limit) for user, key, _ in asking])
        except Exception as exc:  # noqa: BLE001 - every handshake of the batch fails open
            outcomes = [exc] * len(asking)
        for (_, _, fut), outcome in zip(asking, outcomes):
            if not fut.done():
                fut.set_result(outcome)

    def abandon(self, conn) -> None:
        self._release(conn)

    def on_close(self, conn) -> None:
        self._release(conn)

    def _release(self, conn) -> None:
        held = self.held.pop(conn, None)
        if held is None:
            return
        task = asyncio.get_running_loop().create_task(self._release_slot(*held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_slot(self, user: str, key: str) -> None:
        try:
            await self.backend.release_user_slot(user, key)
        except Exception as exc:  # noqa: BLE001 - it expires with the TTL instead
            log.debug("cannot release a user slot", extra={"user": user, "error": str(exc)[:200]})

    async def heartbeat(self) -> None:
        if self.held:
            await self.backend.refresh_user_slots(list(self.held.values()))
