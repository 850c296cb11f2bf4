"""The Python SDK's Client: one WebSocket connection to a ws-gateway `/ws` endpoint that
reconnects, re-joins, recovers and refreshes its token on its own.

Theory of operation. One task (`_run`) owns the connection state machine

    disconnected -> connecting -> connected -> disconnected -> ... -> closed

Each pass: get a token if needed, connect, write the join of every subscription (with its
position when it has one) and every publish waiting for a connection in one batch, then
read frames until the connection ends. The close code decides what follows (backoff.py):

    1001, 1012      reconnect soon, spread over uniform(0, restart_spread)
    4000            reconnect (ordinary backoff) and recover every room from its position
    4001            get_token, then reconnect at once (no get_token: stop, AuthError)
    4002, 4003      long backoff (at least long_backoff_min)
    4004            stop (PolicyClose): reconnecting would be refused again
    HTTP 401, 403   stop (AuthError), never hammer the server
    anything else   full-jitter exponential backoff between min_backoff and max_backoff

Requests carry integer ids; every one has a timer (`command_timeout`) and a future that
settles exactly once: ack, error, timeout, connection lost, or client closed. A join that
times out means the connection is broken (reconnect); a publish that times out raises
CommandTimeout. A publish with an idempotency key survives reconnects (the server answers a
repeat with the original seq); one without fails with ConnectionLost when the connection
drops, since it may or may not have been applied.

Liveness: every read from the server counts (messages, and pings/pongs through the
transport's on_activity hook). After `ping_interval` without one the client pings; after
`ping_interval + ping_timeout` without one it drops the connection and reconnects. The
client pings on its own instead of waiting for the server's pings so that it does not depend
on the server's ping settings; the gateway pings only connections silent towards it.

Token refresh: with `get_token`, the client reads the token's `exp` (JWT payload, not
verified: only the server can) and sends {"op":"refresh"} ahead of it (`refresh_ahead`,
at most half the remaining lifetime); a new handshake after a 4001 or with an expired token
fetches a new one first.

Time, randomness and the connection are injected (`clock`, `random`, `connect`) so the
conformance transcripts drive every timer deterministically (tests/sdk/).

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
from .events import Connected, Disconnected, Emitter, ErrorEvent, Position
from .subscription import JOINED, JOINING, LEFT, RECOVERING, Subscription
from .transport import HandshakeRejected, TransportClosed

log = logging.getLogger("gateway.client")

# Join refusals worth retrying on the same connection (the server may succeed later).
RETRYABLE_JOIN_ERRORS = frozenset({"broker_unavailable", "internal_error", "rate_limited"})
MAX_IDEMPOTENCY_KEY_CHARS = 128


class ClientState(str, enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class _Request:
    """One request awaiting its ack: the future the caller awaits and its timer."""

    __slots__ = ("kind", "doc", "fut", "timer", "id", "sub", "since", "last", "retry")

    def __init__(self, kind: str, doc: dict, fut: asyncio.Future | None, sub: Subscription | None = None,
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
    `await close()`). See docs/clients-python.md for the whole API."""

    EVENTS = ("connected", "disconnected", "error", "state")

    def __init__(self, url: str, *, token: str | None = None,
                 get_token: Callable[[], Awaitable[str] | str] | None = None,
                 encoding: str = "json", headers: dict | None = None, token_via: str = "header",
                 min_backoff: float = 0.5, max_backoff: float = 20.0, long_backoff_min: float = 15.0,
                 long_backoff_max: float = 120.0, restart_spread: float = 2.0,
                 command_timeout: float = 10.0, connect_timeout: float = 10.0,
                 ping_interval: float | None = 20.0, ping_timeout: float = 10.0, refresh_ahead: float = 30.0,
                 max_queue: int = 10_000, connect: Callable | None = None, clock: Clock | None = None,
                 random: Callable[[], float] | None = None, **connect_options: Any) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string")
        if token_via not in ("header", "query"):
            raise ValueError("token_via must be 'header' (Authorization: Bearer) or 'query' (?token=)")
        if command_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("command_timeout and connect_timeout must be > 0")
        if ping_interval is not None and ping_interval < 0 or ping_timeout < 0:
            raise ValueError("ping_interval and ping_timeout must be >= 0")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.url = url
        self._token = token
        self._get_token = get_token
        self._codec = codec_for(encoding)
        self._wire = self._codec            # this connection's codec (JSON if msgpack was declined)
        self._headers = dict(headers or {})
        self._token_via = token_via
        self.backoff = policy.Backoff(min_backoff, max_backoff, long_backoff_min, long_backoff_max, restart_spread)
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval or None
        self.ping_timeout = ping_timeout
        self.refresh_ahead = refresh_ahead
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
        self._subs: dict[str, Subscription] = {}
        self._requests: dict[int, _Request] = {}      # in flight on the current connection
        self._outbox: list[_Request] = []              # publishes waiting for a connection
        self._next_id = 0
        self._transport = None
        self._out: list = []                           # encoded frames for the writer
        self._writer_wake: asyncio.Future | None = None
        self._writer_task: asyncio.Task | None = None
        self._run_task: asyncio.Task | None = None
        self._sleep_fut: asyncio.Future | None = None
        self._sleep_timer = None
        self._attempt = 0                              # consecutive ordinary failures
        self._long_attempt = 0                         # consecutive 4002/4003 closes
        self._token_stale = False                      # 4001 seen: fetch a new token first
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

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> "Client":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def start(self) -> "Client":
        """Start connecting in the background (idempotent). Joins and publishes made before the
        connection is up are sent once it is."""
        if self.state is ClientState.CLOSED:
            raise ClientClosed("this client was closed; create a new one")
        if self._run_task is None:
            self._run_task = asyncio.ensure_future(self._run())
        return self

    async def close(self) -> None:
        """Close the connection (1000) and stop. Every pending request fails with ClientClosed,
        every subscription's iteration ends."""
        if self.state is not ClientState.CLOSED:
            self._shutdown(None)
        transport = self._transport
        if transport is not None:
            try:
                await transport.close(1000, "client closed")
            except Exception:  # already gone: nothing to close
                pass
        task = self._run_task
        if task is not None and not task.done():
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
        fut = asyncio.get_running_loop().create_future()
        self._connected_waiters.append(fut)
        await fut

    # -- events and positions ---------------------------------------------------------------

    def on(self, event: str, callback=None):
        """connected(Connected), disconnected(Disconnected), error(ErrorEvent), state(ClientState)."""
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
                # The caller gave up (e.g. a timeout around join): it is not joined.
                self._drop_sub(sub, "leave")
            raise

    async def leave(self, room: str) -> None:
        """Leave `room`: its subscription's iteration ends, nothing of it is delivered any more."""
        sub = self._subs.get(room)
        if sub is None:
            return
        self._drop_sub(sub, "leave")

    def _drop_sub(self, sub: Subscription, reason: str) -> None:
        del self._subs[sub.room]
        was = sub.state
        sub._finish(reason)
        self._maybe_resume(sub)
        if self.state is ClientState.CONNECTED and was in (JOINED, RECOVERING, JOINING):
            # Also when the join is still in flight: the leave follows it in order.
            self._send(_Request("leave", {"op": "leave", "room": sub.room}, None))

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
            raise self.stop_error or ClientClosed("the client is closed")

    def _send(self, req: _Request) -> None:
        """Give `req` an id, register it and queue its frame (connected only)."""
        self._next_id += 1
        rid = req.id = self._next_id
        doc = req.doc
        doc["id"] = rid
        self._requests[rid] = req
        if req.timer is None:
            req.timer = self._clock.call_later(self.command_timeout, self._request_timeout, req)
        self._write(self._wire.encode(doc))
        doc.pop("id", None)

    def _send_join(self, sub: Subscription, recovery: bool = False) -> None:
        doc = {"op": "join", "room": sub.room}
        req = _Request("join", doc, None, sub)
        if sub.seq is not None and sub.epoch is not None:
            req.since = Position(sub.epoch, sub.seq)
            doc["since"] = {"seq": sub.seq, "epoch": sub.epoch}
        elif sub.last:
            req.last = True
            doc["last"] = True
        sub.state = RECOVERING if recovery else JOINING
        self._send(req)

    def _recover(self, sub: Subscription) -> None:
        """A gap or a `dropped` notice: ask for the missed range on this connection."""
        if sub.state != JOINED or self.state is not ClientState.CONNECTED:
            return
        self._send_join(sub, recovery=True)

    def _request_timeout(self, req: _Request) -> None:
        req.timer = None
        self._forget(req)
        if req.fut is not None and not req.fut.done():
            req.fut.set_exception(CommandTimeout(f"{req.kind} got no answer within the timeout"))
        if req.kind in ("join", "leave") and self._transport is not None:
            # The server does not answer the protocol: treat the connection as broken.
            self._abort_connection(f"{req.kind} got no answer within {self.command_timeout:g} s")

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

    def _settle(self, req: _Request, exc: BaseException | None = None, result=None) -> None:
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
                self._shutdown(ClientStopped(1011, f"client failure: {exc!r}"[:200]))

    def _set_state(self, state: ClientState) -> None:
        if self.state is not state:
            self.state = state
            self._emitter.emit("state", state)

    async def _session(self) -> float | None:
        """One connection attempt and, if it opens, its whole life. Returns the delay before
        the next attempt, or None to stop."""
        self._set_state(ClientState.CONNECTING)
        try:
            token = await self._handshake_token()
        except ClientStopped as exc:
            self._shutdown(exc)
            return None
        except Exception as exc:
            err = exc if isinstance(exc, TokenError) else TokenError(f"get_token failed: {exc!r}"[:300])
            self._emitter.emit("error", ErrorEvent(err))
            return self._failed(1006, "get_token failed")
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
            if exc.status in policy.STOP_HTTP:
                self._shutdown(AuthError(exc.status, exc.reason or "handshake refused"))
                return None
            return self._failed(exc.status, exc.reason or "handshake refused")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(1006, f"connect failed: {exc!r}"[:200])
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
        # Every room with its position and every waiting publish, in one write.
        for sub in list(self._subs.values()):
            if sub._retry_timer is None:
                self._send_join(sub)
        outbox, self._outbox = self._outbox, []
        for req in outbox:
            if req.fut is not None and not req.fut.done():
                self._send(req)
        self._writer_task = asyncio.ensure_future(self._writer(transport))
        self._touch()
        self._pinged = False
        self._arm_liveness(self.ping_interval)
        self._schedule_refresh()
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
                    self._emitter.emit("error", ErrorEvent(ClientError(f"undecodable frame from the server: {exc!r}"[:200])))
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
        """Clean up after a connection: timers, the writer, requests in flight."""
        self._transport = None
        for name in ("_live_timer", "_refresh_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        if self._writer_task is not None:
            self._writer_task.cancel()
            self._writer_task = None
        self._out = []
        requests, self._requests = self._requests, {}
        for req in requests.values():
            req.id = None
            if req.kind == "publish":
                if req.retry and self.state is not ClientState.CLOSED:
                    self._outbox.append(req)          # keeps its timer: the caller's deadline
                else:
                    self._settle(req, ConnectionLost("the connection closed before the publish was acknowledged"))
            else:
                self._settle(req, ConnectionLost(f"the connection closed during {req.kind}"))
        for sub in self._subs.values():
            if sub.state in (JOINED, RECOVERING):
                sub.state = JOINING
            if sub._retry_timer is not None:
                sub._retry_timer.cancel()
                sub._retry_timer = None
        self._paused_by = None
        if self._resume_fut is not None and not self._resume_fut.done():
            self._resume_fut.set_result(None)
        if self.state is ClientState.CONNECTED:
            self._set_state(ClientState.DISCONNECTED)

    def _after_close(self, code: int, reason: str) -> float | None:
        """The close-code policy (module docstring); emits `disconnected`."""
        if self.state is ClientState.CLOSED:
            return None
        if code in policy.STOP:
            self._shutdown(PolicyClose(code, reason or "closed by server policy"), code, reason)
            return None
        if code == policy.TOKEN_EXPIRED:
            if self._get_token is None:
                self._shutdown(AuthError(code, "token expired and no get_token to renew it"), code, reason)
                return None
            self._token_stale = True
            delay = 0.0
        elif code in policy.RECONNECT_SOON:
            delay = self.backoff.restart_delay(self._random())
        elif code in policy.LONG_BACKOFF:
            delay = self.backoff.long_delay(self._long_attempt, self._random())
            self._long_attempt += 1
        else:
            delay = self.backoff.delay(self._attempt, self._random())
            self._attempt += 1
        if code not in policy.LONG_BACKOFF:
            self._long_attempt = 0
        self._set_state(ClientState.DISCONNECTED)
        self._emitter.emit("disconnected", Disconnected(code, reason, True, delay))
        return delay

    def _failed(self, code: int, reason: str) -> float | None:
        """A connection attempt failed before opening: ordinary backoff."""
        if self.state is ClientState.CLOSED:
            return None
        delay = self.backoff.delay(self._attempt, self._random())
        self._attempt += 1
        self._set_state(ClientState.DISCONNECTED)
        self._emitter.emit("disconnected", Disconnected(code, reason, True, delay))
        return delay

    def _shutdown(self, error: ClientStopped | None, code: int | None = None, reason: str = "") -> None:
        """Enter CLOSED: settle every future, end every subscription. error: why the client
        stopped on its own (None: the application closed it)."""
        was_connected = self.state is ClientState.CONNECTED
        self.stop_error = error
        self._set_state(ClientState.CLOSED)
        closed = error if error is not None else ClientClosed("the client was closed")
        if self._sleep_fut is not None and not self._sleep_fut.done():
            self._sleep_fut.set_result(None)
        for timer_name in ("_sleep_timer", "_live_timer", "_refresh_timer"):
            timer = getattr(self, timer_name)
            if timer is not None:
                timer.cancel()
                setattr(self, timer_name, None)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        requests = list(self._requests.values()) + self._outbox
        self._requests, self._outbox = {}, []
        for req in requests:
            self._settle(req, closed)
        waiters, self._connected_waiters = self._connected_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(closed)
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub._finish("closed", error)
        self._paused_by = None
        if self._resume_fut is not None and not self._resume_fut.done():
            self._resume_fut.set_result(None)
        if error is not None:
            self._emitter.emit("error", ErrorEvent(error))
            if code is not None or not was_connected:
                self._emitter.emit("disconnected", Disconnected(
                    code if code is not None else error.code, reason or error.reason, False, None))

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

    # -- internals: writing -----------------------------------------------------------------

    def _write(self, frame) -> None:
        self._out.append(frame)
        wake = self._writer_wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _writer(self, transport) -> None:
        """Writes what was queued during a loop pass in one transport.send (order kept)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._out:
                    self._writer_wake = loop.create_future()
                    await self._writer_wake
                    self._writer_wake = None
                frames, self._out = self._out, []
                await transport.send(frames)
        except (TransportClosed, asyncio.CancelledError):
            pass
        except Exception as exc:
            if self._transport is transport:
                self._abort_connection(f"send failed: {exc!r}"[:200])

    def _abort_connection(self, reason: str) -> None:
        transport = self._transport
        if transport is None:
            return
        self._close_override = (1006, reason)
        log.info("ws-gateway client: dropping the connection: %s", reason)
        transport.abort()

    # -- internals: liveness ----------------------------------------------------------------

    def _touch(self) -> None:
        self._last_rx = self._clock.monotonic()

    def _arm_liveness(self, delay: float | None) -> None:
        if delay is None:
            return
        self._live_timer = self._clock.call_later(delay, self._check_liveness)

    def _check_liveness(self) -> None:
        self._live_timer = None
        transport = self._transport
        if transport is None:
            return
        interval, timeout = self.ping_interval, self.ping_timeout
        now = self._clock.monotonic()
        if self._paused_by is not None:
            # We stopped reading on purpose (the app is behind): silence is ours, not the server's.
            self._last_rx = now
        idle = now - self._last_rx
        if idle >= interval + timeout:
            self._abort_connection(f"no frame from the server for {idle:.1f} s (ping_interval + ping_timeout)")
            return
        if idle >= interval:
            if not self._pinged:
                self._pinged = True
                self._spawn(transport.ping())
            self._arm_liveness(self._last_rx + interval + timeout - now)
        else:
            self._pinged = False
            self._arm_liveness(self._last_rx + interval - now)

    def _spawn(self, aw) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()   # a failed ping: the connection is going away anyway

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
                               req.sub.room if req is not None and req.sub is not None else doc.get("room"))
            if req is None:
                self._emitter.emit("error", ErrorEvent(err))   # e.g. rate_limited before a 4002
            else:
                self._on_error(req, err)
        elif op == "dropped":
            sub = self._subs.get(doc.get("room"))
            if sub is not None and sub.epoch is not None:
                self._recover(sub)
        elif op == "reset":
            sub = self._subs.get(doc.get("room"))
            if sub is not None and sub.state != LEFT:
                sub._on_reset_op(doc.get("epoch"), doc.get("seq"))
        # Unknown ops are ignored: later servers may add events this client does not know.

    def _on_ack(self, req: _Request, doc: dict) -> None:
        if req.kind == "join":
            self._settle(req)
            sub = req.sub
            if self._subs.get(sub.room) is not sub:
                return   # left (or replaced) while the join was in flight; the leave follows it
            sub._on_ack(doc, req.since, req.last)
        else:
            self._settle(req, result=doc)

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
        if err.code in RETRYABLE_JOIN_ERRORS:
            # The server cannot join us now (e.g. its broker is down): try again later.
            sub._emitter.emit("error", err)
            sub.state = JOINING
            delay = self.backoff.delay(sub._retry_attempt, self._random())
            sub._retry_attempt += 1
            sub._retry_timer = self._clock.call_later(delay, self._retry_join, sub)
            return
        del self._subs[sub.room]
        sub._finish("error", err)
        self._maybe_resume(sub)

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

    async def _handshake_token(self) -> str | None:
        if self._get_token is None:
            if self._token_stale:
                raise AuthError(4001, "token expired and no get_token to renew it")
            return self._token
        token = self._token
        if token is None or self._token_stale or self._expired(token):
            token = await self._fetch_token()
            self._token = token
            self._token_stale = False
        return token

    def _expired(self, token: str) -> bool:
        exp = jwt_exp(token)
        return exp is not None and exp <= self._clock.time()

    async def _fetch_token(self) -> str:
        result = self._get_token()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await self._timed(result, self.command_timeout)
        if not isinstance(result, str) or not result:
            raise TokenError("get_token must return a non-empty string")
        return result

    def _schedule_refresh(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        if self._get_token is None or self._token is None or self._transport is None:
            return
        exp = jwt_exp(self._token)
        if exp is None:
            return
        remaining = exp - self._clock.time()
        lead = min(self.refresh_ahead, max(0.0, remaining) / 2)
        self._refresh_timer = self._clock.call_later(max(0.0, remaining - lead), self._start_refresh)

    def _start_refresh(self) -> None:
        self._refresh_timer = None
        if self._transport is not None and self._refresh_task is None:
            self._refresh_task = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        """In-band {"op":"refresh"} with a token from get_token, ahead of the current exp."""
        try:
            try:
                token = await self._fetch_token()
                req = _Request("refresh", {"op": "refresh", "token": token},
                               asyncio.get_running_loop().create_future())
                if self.state is not ClientState.CONNECTED:
                    self._token = token   # the next handshake uses it
                    return
                self._send(req)
                await req.fut
            except CommandError as exc:
                if exc.code == "unsupported":
                    return   # a server without authentication: nothing to refresh
                self._emitter.emit("error", ErrorEvent(exc))
                self._retry_refresh()
                return
            except (ConnectionLost, ClientClosed):
                return
            except Exception as exc:
                err = exc if isinstance(exc, ClientError) else TokenError(f"get_token failed: {exc!r}"[:300])
                self._emitter.emit("error", ErrorEvent(err))
                self._retry_refresh()
                return
            self._token = token
            self._refresh_task = None
            self._schedule_refresh()
        finally:
            if self._refresh_task is asyncio.current_task():
                self._refresh_task = None

    def _retry_refresh(self) -> None:
        """A refresh failed: try again while the current token lasts (after it, the server
        closes with 4001 and the reconnect fetches a new token)."""
        exp = jwt_exp(self._token) if self._token else None
        if exp is None or self._transport is None:
            return
        remaining = exp - self._clock.time()
        if remaining > 1.0:
            self._refresh_timer = self._clock.call_later(min(remaining / 2, max(1.0, self.backoff.max_delay)),
                                                         self._start_refresh)


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
