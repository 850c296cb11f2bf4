"""The Python SDK's Client: one WebSocket connection to a ws-gateway `/ws` endpoint that
reconnects, re-joins, recovers and refreshes its token on its own.

Theory of operation. One task (`_run`) owns the connection state machine

    disconnected -> connecting -> connected -> disconnected -> ... -> closed

Each pass: get a token if needed, connect, write the join of every subscription (with its
position when it has one) and every publish waiting for a connection in one write, emit
`connected`, then read frames until the connection ends. The close code decides what
follows (backoff.py has the delays):

    1001, 1012      reconnect soon, spread over r * restart_spread
    4000            reconnect (ordinary backoff) and recover every room from its position
    4001            get_token, then reconnect at once
    4002, 4003      long backoff
    4004            stop (PolicyClose): reconnecting would be refused again
    HTTP 401, 403   stop (AuthError), never hammer the server; with get_token, a 401 with a
                    token not fetched for that very attempt first gets one fresh token
    anything else   full-jitter exponential backoff

Requests carry integer ids; every one settles exactly once: ack, error reply, timeout
(`command_timeout`), connection lost, or client closed. A join that times out means the
server does not answer the protocol: the client closes with 3008 and reconnects. A publish
with an idempotency key survives reconnects (the server answers a repeat with the original
seq); one without fails with code "disconnected" when the connection drops, since it may or
may not have been applied.

Liveness: every read from the server counts (messages, and pings/pongs through the
transport's on_activity hook). After `ping_interval` without one the client sends a
WebSocket ping (the gateway's WebSocket layer answers it; no protocol op involved); after
`ping_interval + liveness_margin` without one it closes with 3008 and reconnects.

Token refresh: with `get_token`, the client reads the token's `exp` (JWT payload, not
verified: only the server can) and, at exp - min(refresh_margin, lifetime / 2), calls
get_token and sends {"op":"refresh"}. A reconnect fetches a new token first when the one it
has expires within refresh_margin, or after a 4001.

Time, randomness and the connection are injected (`clock`, `random`, `connect`) so the
conformance transcripts drive every timer deterministically (tests/sdk/transcripts/, run by
tests/unit/test_client_transcripts.py).

Must not import any gateway module outside gateway.client, nor gateway_ext, uvloop or redis.
"""
from __future__ import annotations

import asyncio
import base64
import enum
import json
import logging
import random as _random
import urllib.parse
from typing import Any, Awaitable, Callable

from . import backoff as policy
from .clock import Clock, LoopClock
from .codec import MSGPACK_SUBPROTOCOL, JsonCodec, codec_for
from .errors import (AuthError, ClientClosed, ClientError, ClientStopped, CommandError, CommandTimeout,
                     ConnectionLost, PolicyClose, TokenError)
from .events import Connected, Disconnected, Emitter, Position
from .subscription import JOINED, JOINING, LEFT, RECOVERING, Subscription
from .transport import HandshakeRejected, TransportClosed

log = logging.getLogger("gateway.client")

# Join refusals that retrying cannot fix: the subscription ends (error, then left).
PERMANENT_JOIN_ERRORS = frozenset({"forbidden", "bad_room", "room_name_too_long", "too_many_rooms", "bad_request"})
MAX_IDEMPOTENCY_KEY_CHARS = 128


class ClientState(str, enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class _Request:
    """One request awaiting its ack: the future the caller awaits and its timer."""

    __slots__ = ("kind", "doc", "fut", "timer", "id", "sub", "since", "last", "retry")

    def __init__(self, kind: str, doc: dict, fut: asyncio.Future | None = None, sub: Subscription | None = None,
                 retry: bool = False) -> None:
        self.kind = kind          # join | leave | publish | refresh
        self.doc = doc
        self.fut = fut
        self.timer = None
        self.id: int | None = None
        self.sub = sub
        self.since: Position | None = None
        self.last = False
        self.retry = retry        # resend after a reconnect (publish with an idempotency key)


def jwt_exp(token: str) -> float | None:
    """The `exp` claim of a JWT (RFC 7519 section 4.1.4), read without verifying anything;
    None when the token is not a JWT or has no numeric exp."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


class Client:
    """A ws-gateway client. Use `async with Client(url, token=...) as client:` (or `start()` /
    `await close()`). Options are in seconds; see docs/clients.md#python for the whole API."""

    EVENTS = ("connected", "disconnected", "error", "state")

    def __init__(self, url: str, *, token: str | None = None,
                 get_token: Callable[[], Awaitable[str] | str] | None = None,
                 encoding: str = "json", headers: dict | None = None, token_via: str = "header",
                 backoff_initial: float = 0.5, backoff_max: float = 20.0, restart_spread: float = 1.0,
                 long_backoff: float = 30.0, command_timeout: float = 10.0, connect_timeout: float = 10.0,
                 ping_interval: float = 20.0, liveness_margin: float = 10.0, refresh_margin: float = 30.0,
                 max_queue: int = 10_000, connect: Callable | None = None, clock: Clock | None = None,
                 random: Callable[[], float] | None = None, **connect_options: Any) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string")
        if token_via not in ("header", "query"):
            raise ValueError("token_via must be 'header' (Authorization: Bearer) or 'query' (?token=)")
        if command_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("command_timeout and connect_timeout must be > 0")
        if ping_interval < 0 or liveness_margin < 0 or refresh_margin < 0:
            raise ValueError("ping_interval, liveness_margin and refresh_margin must be >= 0")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.url = url
        self._codec = codec_for(encoding)
        self._wire = self._codec            # this connection's codec (JSON if msgpack was declined)
        self._headers = dict(headers or {})
        self._token_via = token_via
        self.backoff = policy.Backoff(backoff_initial, backoff_max, restart_spread, long_backoff)
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval          # 0: no pings, no liveness check
        self.liveness_margin = liveness_margin
        self.refresh_margin = refresh_margin
        self.max_queue = max_queue
        if connect is None:
            from .transport import websockets_connect
            connect = websockets_connect(**connect_options)
        elif connect_options:
            raise TypeError(f"unexpected arguments with a custom connect: {', '.join(connect_options)}")
        self._connect = connect
        self._clock: Clock = clock or LoopClock()
        self._random = random or _random.random
        self._emitter = Emitter(self.EVENTS)

        self.state = ClientState.DISCONNECTED
        self.stop_error: ClientStopped | None = None   # why the client stopped on its own
        self._token = token
        self._get_token = get_token
        self._token_obtained: float | None = None      # wall time the token was obtained
        self._token_stale = False                      # 4001 / 401: fetch a new token first
        self._subs: dict[str, Subscription] = {}
        self._requests: dict[int, _Request] = {}      # in flight on the current connection
        self._outbox: list[_Request] = []              # publishes waiting for a connection
        self._next_id = 0
        self._transport = None
        self._batch: list | None = None                # frames collected for one write
        self._run_task: asyncio.Task | None = None
        self._sleep_fut: asyncio.Future | None = None
        self._sleep_timer = None
        self._attempt = 0                              # n: consecutive reconnects (backoff.py)
        self._close_override: tuple[int, str] | None = None
        self._live_timer = None
        self._last_rx = 0.0
        self._pinged = False
        self._refresh_timer = None
        self._refresh_task: asyncio.Task | None = None
        self._connected_waiters: list[asyncio.Future] = []
        self._paused_by: Subscription | None = None
        self._resume_fut: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lost: list[_Request] = []                # to settle once `disconnected` is out

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> "Client":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def start(self) -> "Client":
        """Start connecting in the background (idempotent). Joins and publishes made before the
        connection is up are sent once it is."""
        self._check_open()
        if self._run_task is None:
            if self._token is not None and self._get_token is not None:
                self._token_obtained = self._clock.time()
                self._schedule_refresh()
            self._run_task = asyncio.ensure_future(self._run())
        return self

    async def close(self) -> None:
        """Close the connection (1000) and stop. Every pending request fails with code "closed",
        every subscription's iteration ends."""
        if self.state is ClientState.CLOSED:
            await self._join_run_task()
            return
        was_connected = self.state is ClientState.CONNECTED
        self._set_state(ClientState.CLOSED)
        transport = self._transport
        if transport is not None:
            closing = asyncio.ensure_future(transport.close(1000, "client closed"))
            await asyncio.sleep(0)     # the close frame leaves before anything is settled
        else:
            closing = None
        if was_connected:
            self._emitter.emit("disconnected", Disconnected(1000, "client closed", False, None))
        self._shutdown(None)
        if closing is not None:
            try:
                await closing
            except Exception:   # already gone: nothing to close
                pass
        await self._join_run_task()

    async def _join_run_task(self) -> None:
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def wait_connected(self) -> None:
        """Until the client is connected (raises ClientClosed/ClientStopped if it ends first)."""
        self._check_open()
        if self.state is ClientState.CONNECTED:
            return
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._connected_waiters.append(fut)
        await fut

    # -- events and positions ---------------------------------------------------------------

    def on(self, event: str, callback=None):
        """connected(Connected), disconnected(Disconnected), error(exception with .code),
        state(ClientState). Without a callback: a decorator."""
        return self._emitter.on(event, callback)

    def off(self, event: str, callback=None) -> None:
        self._emitter.off(event, callback)

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return dict(self._subs)

    def positions(self) -> dict[str, Position]:
        """Every subscription's position: save it, pass it back as join(since=...) to resume."""
        return {room: sub.position for room, sub in self._subs.items() if sub.seq is not None}

    # -- the application's requests ---------------------------------------------------------

    async def join(self, room: str, *, since=None, last: bool = False, wait: bool = True) -> Subscription:
        """Join `room` now and after every reconnect; returns its Subscription once the server
        acked the join (wait=False: at once). `since` (a Position, (epoch, seq) or the dict of
        Position.to_json) resumes from a saved position; `last` asks for the room's latest
        publication first. Raises CommandError when the server refuses the join."""
        _check_room(room)
        self._check_open()
        sub = self._subs.get(room)
        if sub is None:
            sub = Subscription(self, room, Position.parse(since) if since is not None else None, bool(last))
            self._subs[room] = sub
            if self.state is ClientState.CONNECTED:
                self._send_join(sub)
            else:
                self.start()
        if not wait:
            return sub
        try:
            return await sub.wait_joined()
        except asyncio.CancelledError:
            if sub.state != JOINED and self._subs.get(room) is sub:
                self._drop_sub(sub, "app")   # the caller gave up (a timeout around join)
            raise

    async def leave(self, room: str) -> None:
        """Leave `room`: a leave is sent (when connected), its subscription emits `left` and
        its iteration ends; nothing of the room is delivered any more."""
        sub = self._subs.get(room)
        if sub is not None:
            self._drop_sub(sub, "app")

    def _drop_sub(self, sub: Subscription, reason: str) -> None:
        del self._subs[sub.room]
        if self.state is ClientState.CONNECTED and sub.state in (JOINED, RECOVERING, JOINING):
            # Also when its join is still in flight: the leave follows it in order.
            self._send(_Request("leave", {"op": "leave", "room": sub.room}))
        sub._finish(reason)
        self._maybe_resume(sub)

    async def publish(self, room: str, data: Any, *, idempotency_key: str | None = None,
                      timeout: float | None = None) -> int | None:
        """Publish `data` (JSON-representable) to `room`; returns the publication's seq. Waits
        for a connection if there is none, within `timeout` (default command_timeout).
        With an idempotency key the publish is repeated after a reconnect and the server
        answers a repeat with the original seq; without one, a connection lost while it is
        in flight raises ConnectionLost (it may or may not have been published)."""
        _check_room(room)
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key
                                            or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS):
            raise ValueError(f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        self._check_open()
        doc = {"op": "publish", "room": room, "data": data}
        if idempotency_key is not None:
            doc["idempotency_key"] = idempotency_key
        req = _Request("publish", doc, asyncio.get_running_loop().create_future(), retry=idempotency_key is not None)
        req.timer = self._clock.call_later(self.command_timeout if timeout is None else timeout,
                                           self._request_timeout, req)
        if self.state is ClientState.CONNECTED:
            self._send(req)
        else:
            self._outbox.append(req)
            self.start()
        try:
            ack = await req.fut
        except asyncio.CancelledError:
            self._forget(req)
            raise
        seq = ack.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    # -- internals: requests ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is ClientState.CLOSED:
            raise _fresh(self.stop_error) if self.stop_error is not None else ClientClosed("the client is closed")

    def _send(self, req: _Request) -> None:
        """Give `req` an id, register it and write its frame (connected only)."""
        self._next_id += 1
        rid = req.id = self._next_id
        doc = req.doc
        doc["id"] = rid
        self._requests[rid] = req
        if req.timer is None:
            req.timer = self._clock.call_later(self.command_timeout, self._request_timeout, req)
        frame = self._wire.encode(doc)
        del doc["id"]
        batch = self._batch
        if batch is not None:
            batch.append(frame)
        else:
            self._transport.send((frame,))

    def _send_join(self, sub: Subscription, recovery: bool = False) -> None:
        doc = {"op": "join", "room": sub.room}
        req = _Request("join", doc, None, sub)
        if sub.seq is not None and sub.epoch is not None:
            req.since = Position(sub.epoch, sub.seq)
            doc["since"] = {"epoch": sub.epoch, "seq": sub.seq}
        elif sub.last and not sub._was_joined:
            req.last = True
            doc["last"] = True
        sub.state = RECOVERING if recovery else JOINING
        self._send(req)

    def _recover(self, sub: Subscription) -> None:
        """A gap or a `dropped` notice: ask for the missed range on this connection."""
        if sub.state == JOINED and self.state is ClientState.CONNECTED:
            self._send_join(sub, recovery=True)

    def _request_timeout(self, req: _Request) -> None:
        req.timer = None
        self._forget(req)
        err = CommandTimeout(f"{req.kind} got no answer within the timeout")
        if req.fut is not None and not req.fut.done():
            req.fut.set_exception(err)
        if req.kind == "join" and req.sub is not None and self._subs.get(req.sub.room) is req.sub:
            req.sub._emitter.emit("error", err)
        if req.kind in ("join", "leave"):
            # The server does not answer the protocol: treat the connection as broken.
            self._close_connection(policy.CLIENT_TIMEOUT, f"{req.kind} got no answer within {self.command_timeout:g} s")

    def _forget(self, req: _Request) -> None:
        if req.id is not None and self._requests.get(req.id) is req:
            del self._requests[req.id]
        try:
            self._outbox.remove(req)
        except ValueError:
            pass
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None

    @staticmethod
    def _settle(req: _Request, exc: BaseException | None = None, result=None) -> None:
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        fut = req.fut
        if fut is not None and not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    # -- internals: the connection loop -----------------------------------------------------

    async def _run(self) -> None:
        try:
            while self.state is not ClientState.CLOSED:
                delay = await self._session()
                if delay is None or self.state is ClientState.CLOSED:
                    break
                await self._sleep(delay)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("ws-gateway client: connection loop failed")
            if self.state is not ClientState.CLOSED:
                self._stop(ClientStopped("internal", f"client failure: {exc!r}"[:200]), 1011, "client failure")

    def _set_state(self, state: ClientState) -> None:
        if self.state is not state:
            self.state = state
            self._emitter.emit("state", state)

    async def _session(self) -> float | None:
        """One connection attempt and, if it opens, its whole life. Returns the delay before
        the next attempt, or None to stop."""
        self._set_state(ClientState.CONNECTING)
        try:
            token, fetched = await self._handshake_token()
        except Exception as exc:
            err = exc if isinstance(exc, ClientError) else TokenError(f"get_token failed: {exc!r}"[:300])
            self._emitter.emit("error", err)
            return self._failed()
        url, headers = self.url, dict(self._headers)
        if token is not None:
            if self._token_via == "header":
                headers["Authorization"] = f"Bearer {token}"
            else:
                url = _with_query(url, "token", token)
        subprotocols = [self._codec.subprotocol] if self._codec.subprotocol else []
        try:
            transport = await self._timed(
                self._connect(url, headers=headers, subprotocols=subprotocols, on_activity=self._touch),
                self.connect_timeout)
        except HandshakeRejected as exc:
            if exc.status == 401 and self._get_token is not None and not fetched:
                self._token_stale = True      # maybe just expired: one fresh token, at once
                return 0.0
            code = policy.STOP_HTTP.get(exc.status)
            if code is not None:
                self._stop(AuthError(code, f"handshake refused: HTTP {exc.status} {exc.reason}".rstrip(),
                                     status=exc.status), 1006, exc.reason, exc.status)
                return None
            return self._failed()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("ws-gateway client: connect failed: %r", exc)
            return self._failed()
        if self.state is ClientState.CLOSED:
            await _close_quietly(transport)
            return None
        code, reason = await self._connected(transport)
        return self._after_close(code, reason)

    async def _connected(self, transport) -> tuple[int, str]:
        self._transport = transport
        self._attempt = 0
        self._close_override = None
        self._wire = self._codec if transport.subprotocol == MSGPACK_SUBPROTOCOL else JsonCodec()
        self._set_state(ClientState.CONNECTED)
        # Every room with its position, then every waiting publish: one write.
        self._batch = []
        for sub in list(self._subs.values()):
            if sub._retry_timer is None:
                self._send_join(sub)
        outbox, self._outbox = self._outbox, []
        for req in outbox:
            if req.fut is not None and not req.fut.done():
                self._send(req)
        batch, self._batch = self._batch, None
        if batch:
            transport.send(batch)
        self._touch()
        self._pinged = False
        if self.ping_interval:
            self._live_timer = self._clock.call_later(self.ping_interval, self._check_liveness)
        waiters, self._connected_waiters = self._connected_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self._emitter.emit("connected", Connected(transport.subprotocol))
        try:
            code, reason = await self._read_loop(transport)
        finally:
            self._connection_ended()
        if self._close_override is not None:
            code, reason = self._close_override
            self._close_override = None
        return code, reason

    async def _read_loop(self, transport) -> tuple[int, str]:
        decode = self._wire.decode
        dispatch = self._dispatch
        recv = transport.recv
        try:
            while True:
                frame = await recv()
                try:
                    doc = decode(frame)
                except Exception as exc:
                    self._emitter.emit("error", ClientError(f"undecodable frame from the server: {exc!r}"[:200],
                                                            "bad_frame"))
                    continue
                dispatch(doc)
                if self._paused_by is not None:
                    await self._wait_resume()
        except TransportClosed as exc:
            return exc.code, exc.reason
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a transport failing in an unexpected way: treat as lost
            return 1006, f"connection failed: {exc!r}"[:200]

    def _connection_ended(self) -> None:
        """Clean up after a connection: timers, requests in flight."""
        self._transport = None
        self._batch = None
        if self._live_timer is not None:
            self._live_timer.cancel()
            self._live_timer = None
        if self.state is ClientState.CLOSED:
            return      # close() / _stop settle everything themselves
        requests, self._requests = self._requests, {}
        lost = []
        for req in requests.values():
            req.id = None
            if req.kind == "publish" and req.retry:
                self._outbox.append(req)          # keeps its timer: the caller's deadline
            elif req.kind in ("publish", "refresh"):
                lost.append(req)
            else:
                self._settle(req)                 # join/leave: re-sent or moot after a reconnect
        for sub in self._subs.values():
            if sub.state in (JOINED, RECOVERING):
                sub.state = JOINING
            if sub._retry_timer is not None:
                sub._retry_timer.cancel()
                sub._retry_timer = None
        self._paused_by = None
        if self._resume_fut is not None and not self._resume_fut.done():
            self._resume_fut.set_result(None)
        self._set_state(ClientState.DISCONNECTED)
        self._lost = lost

    def _settle_lost(self) -> None:
        lost, self._lost = self._lost, []
        for req in lost:
            self._settle(req, ConnectionLost(f"the connection closed before the {req.kind} was acknowledged"))

    def _after_close(self, code: int, reason: str) -> float | None:
        """The close-code policy (module docstring); emits `disconnected`."""
        if self.state is ClientState.CLOSED:
            return None
        if code in policy.STOP:
            self._settle_lost()
            self._stop(PolicyClose("policy", reason or "closed by server policy", close_code=code), code, reason)
            return None
        if code == policy.TOKEN_EXPIRED:
            self._token_stale = True
            delay = 0.0
        elif code in policy.RECONNECT_SOON:
            self._attempt += 1
            delay = self.backoff.restart_delay(self._random())
        elif code in policy.LONG_BACKOFF:
            self._attempt += 1
            delay = self.backoff.long_delay(self._random())
        else:
            self._attempt += 1
            delay = self.backoff.delay(self._attempt, self._random())
        self._emitter.emit("disconnected", Disconnected(code, reason, True, delay))
        self._settle_lost()
        return delay

    def _failed(self) -> float | None:
        """A connection attempt failed before opening: ordinary backoff, no event (nothing
        was connected; `state` goes back to disconnected)."""
        if self.state is ClientState.CLOSED:
            return None
        self._attempt += 1
        delay = self.backoff.delay(self._attempt, self._random())
        self._set_state(ClientState.DISCONNECTED)
        return delay

    def _stop(self, error: ClientStopped, code: int, reason: str = "", status: int | None = None) -> None:
        """Stop on the server's word (4004, 401, 403): error, then disconnected (no reconnect)."""
        self.stop_error = error
        self._set_state(ClientState.CLOSED)
        self._emitter.emit("error", error)
        self._emitter.emit("disconnected", Disconnected(code, reason, False, None, status))
        self._shutdown(error)

    def _shutdown(self, error: ClientStopped | None) -> None:
        """Enter CLOSED: settle every future, end every subscription, cancel every timer."""
        self._set_state(ClientState.CLOSED)
        def closed() -> ClientError:
            # One instance per waiter: an exception raised in several tasks would collect
            # all their frames in its traceback.
            return _fresh(error) if error is not None else ClientClosed("the client was closed")
        if self._sleep_fut is not None and not self._sleep_fut.done():
            self._sleep_fut.set_result(None)
        for name in ("_sleep_timer", "_live_timer", "_refresh_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        requests = list(self._requests.values()) + self._outbox + self._lost
        self._requests, self._outbox, self._lost = {}, [], []
        for req in requests:
            self._settle(req, closed())
        waiters, self._connected_waiters = self._connected_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(closed())
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub._finish("closed", error and _fresh(error), quiet=True)
        self._paused_by = None
        if self._resume_fut is not None and not self._resume_fut.done():
            self._resume_fut.set_result(None)

    async def _sleep(self, delay: float) -> None:
        if delay <= 0:
            return
        fut = self._sleep_fut = asyncio.get_running_loop().create_future()
        self._sleep_timer = self._clock.call_later(delay, _resolve, fut)
        try:
            await fut
        finally:
            if self._sleep_timer is not None:
                self._sleep_timer.cancel()
                self._sleep_timer = None
            self._sleep_fut = None

    async def _timed(self, aw: Awaitable, timeout: float):
        """Await `aw` for at most `timeout` seconds of the injected clock (CommandTimeout)."""
        task = asyncio.ensure_future(aw)
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()
        timer = self._clock.call_later(timeout, expire)
        try:
            return await task
        except asyncio.CancelledError:
            if fired:
                raise CommandTimeout(f"no answer within {timeout:g} s") from None
            raise
        finally:
            timer.cancel()

    def _close_connection(self, code: int, reason: str) -> None:
        """Close the current connection ourselves (3008: the server stopped answering)."""
        transport = self._transport
        if transport is None or self._close_override is not None:
            return
        self._close_override = (code, reason)
        log.info("ws-gateway client: closing the connection (%d): %s", code, reason)
        self._spawn(transport.close(code, reason))

    def _spawn(self, aw) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("ws-gateway client: background task failed: %r", task.exception())

    # -- internals: liveness ----------------------------------------------------------------

    def _touch(self) -> None:
        self._last_rx = self._clock.monotonic()

    def _check_liveness(self) -> None:
        """Ping after ping_interval of silence; close (3008) after ping_interval + liveness_margin."""
        self._live_timer = None
        transport = self._transport
        if transport is None:
            return
        interval = self.ping_interval
        deadline = interval + self.liveness_margin
        now = self._clock.monotonic()
        if self._paused_by is not None:
            # We stopped reading on purpose (the app is behind): silence is ours, not the server's.
            self._last_rx = now
        idle = now - self._last_rx
        if idle >= deadline:
            self._close_connection(policy.CLIENT_TIMEOUT, f"no frame from the server for {idle:g} s")
            return
        if idle >= interval:
            if not self._pinged:
                self._pinged = True
                transport.ping()
            due = self._last_rx + deadline
        else:
            self._pinged = False
            due = self._last_rx + interval
        self._live_timer = self._clock.call_later(due - now, self._check_liveness)

    # -- internals: reading -----------------------------------------------------------------

    def _dispatch(self, doc) -> None:
        if type(doc) is not dict:
            return
        op = doc.get("op")
        if op == "message":
            sub = self._subs.get(doc.get("room"))
            if sub is not None:
                seq = doc.get("seq", 0)
                if type(seq) is not int:
                    seq = 0
                sub._on_message(doc.get("data"), seq)
        elif op == "ack":
            req = self._requests.pop(doc.get("id"), None)
            if req is not None:
                self._on_ack(req, doc)
        elif op == "error":
            req = self._requests.pop(doc.get("id"), None) if "id" in doc else None
            err = CommandError(str(doc.get("code", "")), str(doc.get("message", "")),
                               req.sub.room if req is not None and req.sub is not None else None)
            if req is None:
                self._emitter.emit("error", err)   # e.g. rate_limited before a 4002
            else:
                self._on_error(req, err)
        elif op == "dropped":
            sub = self._subs.get(doc.get("room"))
            if sub is not None:
                self._recover(sub)
        elif op == "reset":
            sub = self._subs.get(doc.get("room"))
            if sub is not None and sub.state != LEFT:
                sub._on_reset_op(doc.get("epoch"), doc.get("seq"))
        # Unknown ops are ignored: later servers may add events this client does not know.

    def _on_ack(self, req: _Request, doc: dict) -> None:
        self._settle(req, result=doc)
        if req.kind == "join":
            sub = req.sub
            if self._subs.get(sub.room) is sub:     # else left while the join was in flight
                sub._on_ack(doc, req.since, req.last)

    def _on_error(self, req: _Request, err: CommandError) -> None:
        if req.kind != "join":
            if req.kind == "leave" and err.code == "not_member":
                self._settle(req, result={})
            else:
                self._settle(req, err)
            return
        self._settle(req)
        sub = req.sub
        if self._subs.get(sub.room) is not sub:
            return
        if err.code in PERMANENT_JOIN_ERRORS:
            del self._subs[sub.room]
            sub._finish(err.code, err)
            self._maybe_resume(sub)
            return
        # The server cannot join us now (its broker is down, ...): try again after a delay.
        sub._emitter.emit("error", err)
        sub.state = JOINING
        sub._retry_attempt += 1
        delay = self.backoff.delay(sub._retry_attempt, self._random())
        sub._retry_timer = self._clock.call_later(delay, self._retry_join, sub)

    def _retry_join(self, sub: Subscription) -> None:
        sub._retry_timer = None
        if self._subs.get(sub.room) is sub and self.state is ClientState.CONNECTED and sub.state == JOINING:
            self._send_join(sub)

    # -- internals: flow control ------------------------------------------------------------

    async def _wait_resume(self) -> None:
        while self._paused_by is not None:
            fut = self._resume_fut = asyncio.get_running_loop().create_future()
            await fut
            self._resume_fut = None

    def _maybe_resume(self, sub: Subscription) -> None:
        if self._paused_by is sub and (sub.state == LEFT or len(sub._queue) <= self.max_queue // 2
                                       or not sub._iterating and sub._emitter.has("message")):
            self._paused_by = None
            fut = self._resume_fut
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- internals: tokens ------------------------------------------------------------------

    async def _handshake_token(self) -> tuple[str | None, bool]:
        """The token for the next handshake, and whether it was fetched for it."""
        if self._get_token is None:
            return self._token, False
        token = self._token
        if token is None or self._token_stale or self._expires_soon(token):
            token = await self._fetch_token()
            self._adopt_token(token)
            return token, True
        return token, False

    def _expires_soon(self, token: str) -> bool:
        exp = jwt_exp(token)
        return exp is not None and exp - self._clock.time() <= self.refresh_margin

    async def _fetch_token(self) -> str:
        result = self._get_token()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await self._timed(result, self.command_timeout)
        if not isinstance(result, str) or not result:
            raise TokenError("get_token must return a non-empty string")
        return result

    def _adopt_token(self, token: str) -> None:
        self._token = token
        self._token_stale = False
        self._token_obtained = self._clock.time()
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        if self._get_token is None or self._token is None:
            return
        exp = jwt_exp(self._token)
        if exp is None:
            return
        lifetime = exp - (self._token_obtained if self._token_obtained is not None else self._clock.time())
        at = exp - min(self.refresh_margin, max(0.0, lifetime) / 2)
        self._refresh_timer = self._clock.call_later(max(0.0, at - self._clock.time()), self._start_refresh)

    def _start_refresh(self) -> None:
        self._refresh_timer = None
        if self.state is not ClientState.CLOSED and self._refresh_task is None:
            self._refresh_task = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        """Ahead of exp: a token from get_token, handed over in-band ({"op":"refresh"}) when
        connected, else kept for the next handshake."""
        try:
            token = await self._fetch_token()
            if self.state is not ClientState.CONNECTED:
                self._adopt_token(token)
                return
            req = _Request("refresh", {"op": "refresh", "token": token}, asyncio.get_running_loop().create_future())
            self._send(req)
            await req.fut
            self._adopt_token(token)
        except asyncio.CancelledError:
            raise
        except CommandError as exc:
            # "unsupported": a server without authentication. Otherwise the server keeps the
            # old token until its exp, then closes with 4001 and the reconnect fetches anew.
            if exc.code != "unsupported":
                self._emitter.emit("error", exc)
        except (ConnectionLost, ClientClosed):
            pass
        except Exception as exc:
            self._emitter.emit("error", exc if isinstance(exc, ClientError)
                               else TokenError(f"get_token failed: {exc!r}"[:300]))
        finally:
            if self._refresh_task is asyncio.current_task():
                self._refresh_task = None


def _fresh(error: BaseException) -> BaseException:
    """A copy of `error` without a traceback (to raise it again elsewhere)."""
    cls = type(error)
    clone = cls.__new__(cls, *error.args)
    clone.args = error.args
    clone.__dict__.update(error.__dict__)
    return clone


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def _close_quietly(transport) -> None:
    try:
        await transport.close(1000, "client closed")
    except Exception:
        pass


def _check_room(room) -> None:
    if not isinstance(room, str) or not room:
        raise ValueError("room must be a non-empty string")


def _with_query(url: str, name: str, value: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != name] + [(name, value)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
