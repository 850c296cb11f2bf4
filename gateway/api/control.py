"""Cross-process commands of the server API: one control channel, every process obeys.

A command travels as one JSON message on the presence backend's control channel (Redis:
`<prefix>control`; memory: a loopback) and reaches every gateway process, the sender
included. Each process applies it to its own connections and answers on the same channel
with `{"cmd":"reply","to":<sender node>,"id":<request id>,"node":<its node>,"result":...}`;
the sender collects one answer per live process (the process registry, refreshed every
presence heartbeat) or stops waiting after `timeout` and names the processes that did not
answer (`missing`), so an API caller knows whether the command reached everyone.

Commands:
    disconnect   {"user"|"client", "code", "reason"}      close matching connections
    unsubscribe  {"user"|"client", "room", "reason"}      force them out of one room
    rooms        {"pattern", "limit"}                      local rooms with their member counts
    info         {}                                        this process: pid, connections, uptime
    revoke       {"key", "value", "until"}                 (no answer) apply a revocation

Imports the standard library only; the gateway, tracker and revocation list are passed in.
"""
from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import os
import platform
import time

log = logging.getLogger("gateway.api.control")

DEFAULT_TIMEOUT = 2.0


class ClusterControl:
    def __init__(self, gateway, tracker, revocations=None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.gateway = gateway
        self.tracker = tracker
        self.backend = tracker.backend
        self.revocations = revocations
        self.timeout = timeout
        self.started = time.time()
        self._ids = itertools.count(1)
        self._waiting: dict[str, tuple] = {}     # request id -> (expected nodes, answers, future)
        self.commands_applied = 0
        self.revocations_loaded = 0
        tracker.control_handlers.append(self.handle)
        tracker.state_handlers.append(self.on_state)
        tracker.node_info = self.local_info

    @property
    def node(self) -> str:
        return self.backend.node

    # -- sending ----------------------------------------------------------------------------

    async def request(self, cmd: str, args: dict) -> tuple[list, list]:
        """Send `cmd` to every process; ([(node, result)], [nodes that did not answer])."""
        expected = {n.get("node") for n in await self.backend.nodes() if n.get("node")}
        expected.add(self.node)
        rid = f"{self.node}:{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        answers: dict = {}
        self._waiting[rid] = (expected, answers, fut)
        try:
            await self.backend.send_control({"cmd": cmd, "id": rid, "from": self.node, **args})
            try:
                await asyncio.wait_for(fut, self.timeout)
            except asyncio.TimeoutError:
                pass
        finally:
            self._waiting.pop(rid, None)
        missing = sorted(expected - set(answers))
        return list(answers.items()), missing

    async def announce(self, cmd: str, args: dict) -> None:
        """Send `cmd` to every process without waiting for answers."""
        await self.backend.send_control({"cmd": cmd, "from": self.node, **args})

    async def load_revocations(self) -> None:
        if self.revocations is None:
            return
        entries = await self.backend.load_revocations()
        self.revocations.replace(entries)
        self.revocations_loaded += 1

    # -- receiving --------------------------------------------------------------------------

    def on_state(self, connected: bool) -> None:
        if connected:
            # Revocations announced while this process was cut off were missed: reload them.
            task = asyncio.get_running_loop().create_task(self._reload())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _reload(self) -> None:
        try:
            await self.load_revocations()
        except Exception as exc:  # noqa: BLE001 - retried on the next reconnect
            log.warning("cannot load revocations", extra={"event": "revocations_error", "error": str(exc)[:200]})

    def handle(self, msg: dict) -> None:
        cmd = msg.get("cmd")
        if cmd == "reply":
            if msg.get("to") != self.node:
                return
            waiting = self._waiting.get(msg.get("id"))
            if waiting is None:
                return
            expected, answers, fut = waiting
            answers[msg.get("node")] = msg.get("result")
            if expected <= answers.keys() and not fut.done():
                fut.set_result(None)
            return
        if cmd == "revoke":
            if self.revocations is not None and isinstance(msg.get("key"), str):
                try:
                    self.revocations.apply(msg["key"], str(msg.get("value", "")), float(msg.get("until", 0)))
                except (TypeError, ValueError):
                    return
                self.commands_applied += 1
            return
        apply = _COMMANDS.get(cmd)
        if apply is None:
            return
        try:
            result = apply(self, msg)
        except Exception:
            log.exception("control command failed", extra={"command": str(cmd)[:40]})
            result = {"error": "internal_error"}
        self.commands_applied += 1
        rid, sender = msg.get("id"), msg.get("from")
        if rid and sender:
            task = asyncio.get_running_loop().create_task(self.backend.send_control(
                {"cmd": "reply", "to": sender, "id": rid, "node": self.node, "result": result}))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- the commands, applied to this process ----------------------------------------------

    def _matching(self, msg: dict) -> list:
        """This process's open connections named by msg["user"] or msg["client"]."""
        user, client = msg.get("user"), msg.get("client")
        out = []
        for conn in list(self.gateway.connections):
            if client is not None:
                if self.tracker.conn_key(conn) == client:
                    out.append(conn)
            elif user is not None and conn.user == user:
                out.append(conn)
        return out

    def _disconnect(self, msg: dict) -> dict:
        code = int(msg.get("code", 4005))
        reason = str(msg.get("reason", ""))[:120]
        conns = self._matching(msg)
        for conn in conns:
            log.info("disconnected by the server API", extra={"event": "api_disconnect", "conn": conn.id,
                                                              "user": conn.user, "code": code})
            conn.close(code, reason)
        return {"disconnected": len(conns)}

    def _unsubscribe(self, msg: dict) -> dict:
        room = msg.get("room")
        endpoint = self.gateway.endpoints.get("/ws")
        if not isinstance(room, str) or endpoint is None:
            return {"unsubscribed": 0}
        reason = str(msg.get("reason", "") or "removed by the server")[:120]
        count = 0
        for conn in self._matching(msg):
            session = conn.state
            if session is not None and conn.endpoint is endpoint and endpoint.force_leave(session, room, reason):
                count += 1
        return {"unsubscribed": count}

    def _rooms(self, msg: dict) -> dict:
        pattern = msg.get("pattern") or "*"
        limit = int(msg.get("limit") or 1000)
        hub = getattr(self.gateway, "hub", None)
        out = {}
        if hub is not None:
            for name, room in hub.rooms.items():
                if pattern == "*" or fnmatch.fnmatchcase(name, pattern):
                    out[name] = len(room)
                    if len(out) >= limit:
                        break
        return {"rooms": out}

    def _info(self, msg: dict) -> dict:
        return self.local_info()

    def local_info(self) -> dict:
        gw = self.gateway
        hub = getattr(gw, "hub", None)
        import gateway_ext
        return {
            "node": self.node, "pid": os.getpid(), "host": platform.node(),
            "connections": len(gw.connections), "rooms": len(hub.rooms) if hub is not None else 0,
            "uptime": round(time.time() - self.started, 3), "started": round(self.started, 3),
            "implementation": gateway_ext.IMPLEMENTATION, "worker": getattr(gw, "worker_index", 0),
        }


_COMMANDS = {
    "disconnect": ClusterControl._disconnect,
    "unsubscribe": ClusterControl._unsubscribe,
    "rooms": ClusterControl._rooms,
    "info": ClusterControl._info,
}
