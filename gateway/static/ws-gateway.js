// ws-gateway.js: the JavaScript client of ws-gateway's /ws rooms protocol. One dependency-free
// ES module for browsers and Node (the global WebSocket of Node 22+, Node 20 with
// --experimental-websocket, or a WebSocket class passed as `options.WebSocket`).
//
// It keeps a position (epoch, seq) per room and delivers each publication exactly once, in
// order: a seq gap or a `dropped` notice makes it ask the server to replay from the last
// delivered seq, and a reconnect re-joins every room with its position (protocol:
// docs/clients.md; the shared behaviour both SDKs pass is tests/sdk/transcripts/README.md).
// JSON text frames only: the msgpack subprotocol is not supported here.
//
// Time and randomness come from options (now, setTimeout, clearTimeout, random) so the
// conformance runner can drive reconnects and timeouts with a fake clock.

const DEFAULTS = {
  backoffInitial: 500,      // ms: bound of the first reconnect delay (full jitter below it)
  backoffMax: 20000,        // ms: cap of the delay bound
  restartSpread: 1000,      // ms: after 1001/1012 (drain, restart) reconnect within this
  longBackoff: 30000,       // ms: after 4002/4003 (rate limited, too many errors)
  pingInterval: 20000,      // ms of silence before an application ping; 0 disables liveness
  livenessMargin: 10000,    // ms: nothing received this long after a ping -> reconnect
  commandTimeout: 10000,    // ms: join/publish/refresh ack deadline
  refreshMargin: 30000,     // ms: refresh the token this long before its exp
  preflight: true,          // after a failed handshake, GET the URL to learn 401/403
};

// Join errors that retrying cannot fix: the subscription is given up (error, then left).
const PERMANENT_JOIN_ERRORS = new Set(["forbidden", "bad_room", "room_name_too_long", "too_many_rooms", "bad_request"]);

// Close codes sent by this client (RFC 6455 section 7.4.2: 1000 or 3000-4999 from scripts).
const CLOSE_NORMAL = 1000;
const CLOSE_TIMEOUT = 3008;   // IANA-registered "timeout": liveness or join ack deadline

/** An error reply or a local failure: `code` is stable (docs/clients.md), `message` for humans. */
export class GatewayError extends Error {
  constructor(code, message, details) {
    super(message || code);
    this.name = "GatewayError";
    this.code = code;
    if (details) Object.assign(this, details);
  }
}

class Emitter {
  constructor() { this._listeners = new Map(); }

  /** Add a listener; returns this (chainable). */
  on(name, fn) {
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(fn);
    return this;
  }

  /** Remove a listener (or every listener of `name` when fn is omitted). */
  off(name, fn) {
    if (fn === undefined) this._listeners.delete(name);
    else this._listeners.get(name)?.delete(fn);
    return this;
  }

  once(name, fn) {
    const wrapper = (data) => { this.off(name, wrapper); fn(data); };
    return this.on(name, wrapper);
  }

  _emit(name, data) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(data);
      } catch (err) {
        // A throwing listener must not break the client's bookkeeping; report it the way
        // an uncaught exception in an event handler is reported by the host.
        queueMicrotask(() => { throw err; });
      }
    }
  }
}

/** base64url JSON payload of a JWT -> its `exp` in seconds, or null (not a JWT, no exp). */
export function tokenExpiry(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const text = typeof atob === "function" ? atob(b64 + "===".slice((b64.length + 3) % 4)) : null;
    const exp = text && JSON.parse(text).exp;
    return typeof exp === "number" && isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

export class Subscription extends Emitter {
  constructor(client, room) {
    super();
    this._client = client;
    this.room = room;
    this.state = "joining";     // joining (waiting for a connection or an ack) | joined | left
    this._epoch = null;
    this._seq = null;           // last delivered seq; null: unknown
    this._everJoined = false;   // acked at least once: a later re-join without position resets
    this._join = null;          // the pending join entry
    this._retries = 0;          // transient join errors in a row
    this._retryTimer = null;
    this._last = false;
    this._lastSeq = null;       // after a `last` join ack: the seq of the replayed latest publication
  }

  /** {epoch, seq} of the last delivered message (null: unknown); store it to resume later. */
  get position() {
    if (this._seq === null && this._epoch === null) return null;
    return { epoch: this._epoch, seq: this._seq };
  }

  /** Resume from a stored position (used by the next join or re-join). null forgets it. */
  set position(p) {
    if (p === null || p === undefined) {
      this._epoch = null;
      this._seq = null;
      return;
    }
    if (typeof p !== "object" || !Number.isInteger(p.seq) || p.seq < 0 ||
        (p.epoch !== null && p.epoch !== undefined && typeof p.epoch !== "string")) {
      throw new TypeError("position must be {epoch: string, seq: non-negative integer}");
    }
    this._epoch = p.epoch ?? null;
    this._seq = p.seq;
  }

  /** Leave the room: no more events, not re-joined after reconnects. */
  leave() { this._client._leave(this, "app"); }

  _deliver(msg) {
    const seq = msg.seq;
    if (typeof seq !== "number" || seq === 0) {
      // Unnumbered (seq 0: Redis was down, this gateway only): deliver, keep the position.
      this._emit("message", { room: this.room, data: msg.data, seq: seq ?? 0 });
      return;
    }
    // After a `last` join the position is already (epoch, TOP) and the room's latest
    // publication, seq TOP, is replayed right after the ack: it is the first numbered message
    // (or, without history, the first is TOP+1 and nothing is owed). Deliver it once.
    const lastSeq = this._lastSeq;
    this._lastSeq = null;
    if (lastSeq !== null && seq === lastSeq) {
      this._emit("message", { room: this.room, data: msg.data, seq });
      return;
    }
    if (this._seq !== null) {
      if (seq <= this._seq) {
        if (this._epoch !== null) return;                 // duplicate (replay overlap)
        // No epoch: the server keeps no history, so it never replays and this is no
        // duplicate: the room's numbering restarted (e.g. Redis restarted). Say so, go on.
        this._seq = seq - 1;
        this._emit("reset", { room: this.room, epoch: null, seq: this._seq, reason: "server_reset" });
      }
      if (seq <= this._seq) return;
      if (seq !== this._seq + 1) {                        // gap: ask for the missing range
        this._client._recover(this);
        return;
      }
    }
    this._seq = seq;
    this._emit("message", { room: this.room, data: msg.data, seq });
  }
}

export class Client extends Emitter {
  /**
   * @param {string} url  ws:// or wss:// URL of the gateway's /ws endpoint
   * @param {object} [options]  token | getToken, backoff and timeouts (see DEFAULTS), WebSocket,
   *   fetch, now, setTimeout, clearTimeout, random
   */
  constructor(url, options = {}) {
    super();
    this.url = String(url);
    const o = (this._opts = Object.assign({}, DEFAULTS, options));
    this._WS = o.WebSocket || globalThis.WebSocket;
    if (typeof this._WS !== "function") {
      throw new TypeError("no WebSocket class: pass options.WebSocket, or run Node 20 with --experimental-websocket (Node 22+ has one)");
    }
    this._now = o.now || (() => Date.now());
    this._setTimeout = o.setTimeout || ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = o.clearTimeout || ((t) => globalThis.clearTimeout(t));
    this._random = o.random || Math.random;
    this._fetch = o.fetch !== undefined ? o.fetch : (typeof globalThis.fetch === "function" ? globalThis.fetch.bind(globalThis) : null);
    this._getToken = typeof o.getToken === "function" ? o.getToken : null;
    this._token = o.token || null;
    this._tokenFresh = false;       // obtained for the current connection attempt
    this._refreshTimer = null;

    this.state = "disconnected";    // disconnected -> connecting -> connected
    this._stopped = false;
    this._gen = 0;                  // bumps on every attempt/stop: stale async work checks it
    this._ws = null;
    this._opened = false;
    this._attempts = 0;             // consecutive reconnects since the last open
    this._reconnectTimer = null;
    this._liveTimer = null;
    this._lastRx = 0;
    this._pingAt = null;            // when the unanswered {"op":"ping"} went out, or null
    this._pingSupported = true;     // per connection: false once this gateway said unknown_op

    this._subs = new Map();         // room -> Subscription, in join order
    this._pending = new Map();      // request id -> entry awaiting its ack
    this._outbox = [];              // publishes waiting for a connection
    this._nextId = 1;
    this._order = 0;

    this._connect(false);
  }

  /** The subscriptions by room (a copy). */
  get subscriptions() { return new Map(this._subs); }

  /**
   * Join a room now and after every reconnect. Joining a room twice returns the same
   * Subscription. `since` ({epoch, seq}) resumes from a stored position; `last` asks for the
   * room's latest publication when there is no position.
   */
  join(room, { since, last } = {}) {
    if (typeof room !== "string" || !room) throw new TypeError("room must be a non-empty string");
    if (this._stopped && this._closedByApp) throw new GatewayError("closed", "client is closed");
    let sub = this._subs.get(room);
    if (sub) {
      if (since) sub.position = since;
      return sub;
    }
    sub = new Subscription(this, room);
    if (since) sub.position = since;
    sub._last = Boolean(last);
    this._subs.set(room, sub);
    if (this.state === "connected") this._sendFrames([this._joinFrame(sub)]);
    return sub;
  }

  /** Leave a room (same as sub.leave()). */
  leave(room) {
    const sub = this._subs.get(room);
    if (sub) this._leave(sub, "app");
  }

  /**
   * Publish `data` (any JSON value) to a room; resolves with the publication's seq.
   * With an idempotencyKey the gateway publishes a retried request once, so the client
   * re-sends it after a reconnect instead of failing; without one a publish in flight when
   * the connection drops rejects with code "disconnected" (it may or may not have happened).
   */
  publish(room, data, { idempotencyKey, timeout } = {}) {
    if (typeof room !== "string" || !room) return Promise.reject(new TypeError("room must be a non-empty string"));
    if (this._stopped) return Promise.reject(new GatewayError("closed", "client is closed"));
    return new Promise((resolve, reject) => {
      const entry = { kind: "publish", room, data, key: idempotencyKey, resolve, reject, order: ++this._order, id: null };
      entry.timer = this._setTimeout(() => {
        this._pending.delete(entry.id);
        this._dequeue(entry);
        reject(new GatewayError("timeout", `no ack for publish to ${room} within the command timeout`));
      }, timeout ?? this._opts.commandTimeout);
      if (this.state === "connected") this._sendFrames([this._publishFrame(entry)]);
      else this._outbox.push(entry);
    });
  }

  /** Stop for good: close the socket (1000), settle everything pending with code "closed". */
  close() {
    if (this._stopped && this._closedByApp) return;
    this._closedByApp = true;
    const ws = this._ws;
    const wasStopped = this._stopped;
    this._stop();
    if (ws) {
      try { ws.close(CLOSE_NORMAL, "client closed"); } catch { /* already closing */ }
    }
    if (!wasStopped) this._emit("disconnected", { code: CLOSE_NORMAL, reason: "client closed", reconnect: false });
    this._failAll(new GatewayError("closed", "client is closed"));
  }

  /** Start again after a stop (401/403/4004): e.g. once the app has a new token. */
  connect({ token } = {}) {
    if (token) { this._token = token; this._tokenFresh = true; }
    if (!this._stopped) return;
    this._stopped = false;
    this._closedByApp = false;
    this._attempts = 0;
    this._connect(false);
  }

  // -- connection life cycle ---------------------------------------------------------------

  _setState(state) { this.state = state; }

  async _connect(forceToken) {
    this._reconnectTimer = null;
    if (this._stopped) return;
    const gen = ++this._gen;
    this._setState("connecting");
    this._tokenFresh = false;
    if (this._getToken && (forceToken || this._token === null || this._expiresSoon())) {
      if (!(await this._fetchToken()) ) {
        if (gen === this._gen && !this._stopped) this._scheduleReconnect("backoff");
        return;
      }
      if (gen !== this._gen || this._stopped) return;
      this._tokenFresh = true;
    }
    this._open();
  }

  _expiresSoon() {
    const exp = tokenExpiry(this._token);
    return exp !== null && exp * 1000 - this._now() <= this._opts.refreshMargin;
  }

  async _fetchToken() {
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      this._emit("error", { code: "token", message: `getToken failed: ${err && err.message || err}`, error: err });
      return false;
    }
    if (typeof token !== "string" || !token) {
      this._emit("error", { code: "token", message: "getToken returned no token" });
      return false;
    }
    this._token = token;
    this._scheduleRefresh();
    return true;
  }

  _scheduleRefresh() {
    if (this._refreshTimer !== null) this._clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const exp = tokenExpiry(this._token);
    if (exp === null || !this._getToken || this._stopped) return;
    const lifetime = exp * 1000 - this._now();
    // Refresh `refreshMargin` ahead, but never in the first half of a short-lived token's life.
    const delay = Math.max(0, lifetime - Math.min(this._opts.refreshMargin, lifetime / 2));
    this._refreshTimer = this._setTimeout(() => this._refresh(), delay);
  }

  async _refresh() {
    this._refreshTimer = null;
    const gen = this._gen;
    if (!(await this._fetchToken())) {
      if (!this._stopped) this._refreshTimer = this._setTimeout(() => this._refresh(), this._opts.backoffInitial * 10);
      return;
    }
    if (this._stopped || gen !== this._gen || this.state !== "connected") return;
    const entry = { kind: "refresh", id: this._nextId++ };
    entry.timer = this._setTimeout(() => this._pending.delete(entry.id), this._opts.commandTimeout);
    this._pending.set(entry.id, entry);
    this._sendFrames([{ op: "refresh", token: this._token, id: entry.id }]);
  }

  _url() {
    if (!this._token) return this.url;
    const u = new URL(this.url);
    u.searchParams.set("token", this._token);
    return u.toString();
  }

  _open() {
    let ws;
    try {
      ws = new this._WS(this._url());
    } catch (err) {
      this._emit("error", { code: "bad_url", message: String(err && err.message || err), error: err });
      this._stopWith("bad_url", { code: 1006, reason: "cannot create a WebSocket" });
      return;
    }
    this._ws = ws;
    this._opened = false;
    ws.onopen = () => { if (ws === this._ws) this._onOpen(); };
    ws.onmessage = (ev) => { if (ws === this._ws) this._onMessage(ev.data); };
    ws.onclose = (ev) => { if (ws === this._ws) this._onClose(ev.code, ev.reason || ""); };
    // A failed connection is reported by `error` (then `close` 1006 in browsers; Node 20's
    // WebSocket may fire no close at all after a refused connect): act on the first of them.
    ws.onerror = () => {
      if (ws !== this._ws) return;
      this._onClose(1006, "");      // detaches the handlers first: close() may fire error again
      if (ws.readyState !== undefined && ws.readyState < 2) {
        try { ws.close(); } catch { /* closing already */ }
      }
    };
  }

  _onOpen() {
    this._opened = true;
    this._attempts = 0;
    this._setState("connected");
    this._lastRx = this._now();
    this._pingAt = null;
    this._pingSupported = true;     // a rolling upgrade may put us on a newer gateway now
    // Everything owed to the new connection goes out synchronously, before any await: one
    // write's worth of frames (a WebSocket has no multi-frame send; same tick is the closest).
    const frames = [];
    for (const sub of this._subs.values()) frames.push(this._joinFrame(sub));
    this._outbox.sort((a, b) => a.order - b.order);
    const outbox = this._outbox;
    this._outbox = [];
    for (const entry of outbox) frames.push(this._publishFrame(entry));
    if (frames.length) this._sendFrames(frames);
    this._armLiveness();
    this._emit("connected", {});
  }

  _onClose(code, reason) {
    const wasOpen = this._opened;
    this._teardown();
    if (!wasOpen) {
      this._handshakeFailed(code);
      return;
    }
    if (code === 4004) {
      this._emit("error", { code: "policy", message: `closed by policy (4004)${reason ? ": " + reason : ""}` });
      this._stopWith("policy", { code, reason });
      return;
    }
    this._setState("disconnected");
    this._emit("disconnected", { code, reason, reconnect: true });
    if (code === 4001) {
      // Token expired on a live connection: a new one (getToken), then reconnect at once.
      this._connect(true);
    } else if (code === 1001 || code === 1012) {
      this._scheduleReconnect("spread");
    } else if (code === 4002 || code === 4003) {
      this._scheduleReconnect("long");
    } else {
      this._scheduleReconnect("backoff");
    }
  }

  /** The socket closed before open. Browsers hide the HTTP status of a failed handshake, so
   * ask the same URL over plain HTTP: the gateway answers 401/403 for a bad token before it
   * would answer 426 (upgrade required). Cross-origin without CORS the answer is unreadable
   * and the client keeps backing off (capped), which is slow, not hammering. */
  async _handshakeFailed(code) {
    const gen = ++this._gen;
    this._setState("disconnected");
    let status = null;
    if (this._opts.preflight && this._fetch) {
      try {
        const url = new URL(this._url());
        url.protocol = url.protocol === "wss:" ? "https:" : "http:";
        const res = await this._fetch(url.toString(), { method: "GET", cache: "no-store", redirect: "manual" });
        status = res.status;
      } catch {
        status = null;   // unreachable or unreadable: a network failure
      }
      if (gen !== this._gen || this._stopped) return;
    }
    if (status === 401 && this._getToken && !this._tokenFresh) {
      this._connect(true);   // the token we had may just have expired: one fresh try
      return;
    }
    if (status === 401 || status === 403) {
      const what = status === 401 ? "unauthorized" : "forbidden";
      this._emit("error", { code: what, status, message: `handshake refused with HTTP ${status}` });
      this._stopWith(what, { code, reason: `handshake refused (${status})`, status });
      return;
    }
    this._scheduleReconnect("backoff");
  }

  _scheduleReconnect(kind) {
    if (this._stopped) return;
    this._setState("disconnected");
    this._attempts += 1;
    const o = this._opts;
    const r = this._random();
    let delay;
    if (kind === "spread") delay = r * o.restartSpread;
    else if (kind === "long") delay = o.longBackoff * (0.5 + 0.5 * r);
    else delay = r * Math.min(o.backoffMax, o.backoffInitial * 2 ** (this._attempts - 1));
    this._reconnectTimer = this._setTimeout(() => this._connect(false), delay);
  }

  /** Drop the current socket's state: pending joins are re-sent on the next connection;
   * keyed publishes wait in the outbox, unkeyed ones in flight reject ("disconnected"). */
  _teardown(final = false) {
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    this._opened = false;
    if (this._liveTimer !== null) this._clearTimeout(this._liveTimer);
    this._liveTimer = null;
    for (const sub of this._subs.values()) {
      sub.state = "joining";
      sub._join = null;
      if (sub._retryTimer !== null) this._clearTimeout(sub._retryTimer);
      sub._retryTimer = null;
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) {
      if (entry.kind === "publish") {
        if (final || (entry.key !== undefined && entry.key !== null)) {
          this._outbox.push(entry);   // final: _failAll settles it with the stop's reason
        } else {
          this._clearTimeout(entry.timer);
          entry.reject(new GatewayError("disconnected", "connection lost before the ack; the publish may or may not have happened"));
        }
      } else {
        this._clearTimeout(entry.timer);
      }
    }
  }

  /** Close our own socket (liveness, join timeout) and reconnect with the backoff. */
  _abort(code, reason) {
    const ws = this._ws;
    this._teardown();
    try { ws.close(code, reason); } catch { /* already closing */ }
    this._setState("disconnected");
    this._emit("disconnected", { code, reason, reconnect: true });
    this._scheduleReconnect("backoff");
  }

  _stop() {
    this._stopped = true;
    this._gen++;
    if (this._ws) this._teardown(true);
    for (const t of [this._reconnectTimer, this._refreshTimer, this._liveTimer]) {
      if (t !== null) this._clearTimeout(t);
    }
    this._reconnectTimer = this._refreshTimer = this._liveTimer = null;
    this._setState("disconnected");
  }

  _stopWith(code, closeInfo) {
    this._stop();
    this._emit("disconnected", Object.assign({}, closeInfo, { reconnect: false }));
    this._failAll(new GatewayError(code, `client stopped: ${code}`));
  }

  _failAll(err) {
    for (const entry of [...this._pending.values(), ...this._outbox]) {
      this._clearTimeout(entry.timer);
      if (entry.reject) entry.reject(err);
    }
    this._pending.clear();
    this._outbox = [];
  }

  // -- liveness ------------------------------------------------------------------------------

  _armLiveness() {
    const interval = this._opts.pingInterval;
    if (!interval || !this._pingSupported) return;
    this._liveTimer = this._setTimeout(() => this._checkLive(), interval);
  }

  /** One timer, re-armed lazily: frames only update _lastRx, so a busy connection costs no
   * timer churn. Browsers answer the server's WebSocket pings without telling scripts, so
   * silence is broken with the application-level {"op":"ping"} -> {"op":"pong"}.
   * The connection is declared dead only livenessMargin after a ping that got no frame back,
   * never from the silence alone: browsers run timers of background tabs late (Chrome's
   * intensive throttling: once a minute), and a check that fires 60 s late on an idle room
   * must ping and wait, not reconnect a healthy connection. On time, the two are the same
   * (ping at pingInterval of silence, close at pingInterval + livenessMargin). */
  _checkLive() {
    this._liveTimer = null;
    if (this.state !== "connected" || !this._pingSupported) return;
    const interval = this._opts.pingInterval;
    const margin = this._opts.livenessMargin;
    const now = this._now();
    if (this._pingAt !== null && this._lastRx < this._pingAt) {
      // A ping is out and nothing came since.
      if (now - this._pingAt >= margin) {
        this._abort(CLOSE_TIMEOUT, "no frame from the server");
        return;
      }
      this._liveTimer = this._setTimeout(() => this._checkLive(), this._pingAt + margin - now);
      return;
    }
    this._pingAt = null;
    const idle = now - this._lastRx;
    if (idle >= interval) {
      this._pingAt = now;
      this._sendFrames([{ op: "ping" }]);
      this._liveTimer = this._setTimeout(() => this._checkLive(), margin);
    } else {
      this._liveTimer = this._setTimeout(() => this._checkLive(), interval - idle);
    }
  }

  // -- frames ----------------------------------------------------------------------------------

  _sendFrames(frames) {
    const ws = this._ws;
    if (!ws) return;
    try {
      for (const frame of frames) ws.send(JSON.stringify(frame));
    } catch {
      // The socket is closing; its close event reconnects and re-sends what is owed.
    }
  }

  _joinFrame(sub) {
    const entry = { kind: "join", sub, id: this._nextId++, since: false };
    const frame = { op: "join", room: sub.room, id: entry.id };
    if (typeof sub._epoch === "string" && sub._seq !== null) {
      frame.since = { epoch: sub._epoch, seq: sub._seq };
      entry.since = true;
    } else if (sub._last) {
      frame.last = true;
      entry.last = true;
    }
    sub.state = "joining";
    sub._join = entry;
    entry.timer = this._setTimeout(() => {
      this._pending.delete(entry.id);
      sub._emit("error", { code: "timeout", message: `no ack for join ${sub.room} within the command timeout` });
      if (this.state === "connected") this._abort(CLOSE_TIMEOUT, "join timeout");
    }, this._opts.commandTimeout);
    this._pending.set(entry.id, entry);
    return frame;
  }

  _publishFrame(entry) {
    entry.id = this._nextId++;
    this._pending.set(entry.id, entry);
    const frame = { op: "publish", room: entry.room, data: entry.data, id: entry.id };
    if (entry.key !== undefined && entry.key !== null) frame.idempotency_key = entry.key;
    return frame;
  }

  _dequeue(entry) {
    const i = this._outbox.indexOf(entry);
    if (i >= 0) this._outbox.splice(i, 1);
  }

  _recover(sub) {
    // Stop delivering this room; the replay from the last delivered seq follows the ack.
    this._sendFrames([this._joinFrame(sub)]);
  }

  _leave(sub, reason) {
    if (sub.state === "left") return;
    sub.state = "left";
    this._subs.delete(sub.room);
    if (sub._join) {
      this._pending.delete(sub._join.id);
      this._clearTimeout(sub._join.timer);
      sub._join = null;
    }
    if (sub._retryTimer !== null) this._clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
    if (reason === "app" && this.state === "connected") {
      this._sendFrames([{ op: "leave", room: sub.room, id: this._nextId++ }]);
    }
    sub._emit("left", { room: sub.room, reason });
  }

  _onMessage(raw) {
    this._lastRx = this._now();
    if (typeof raw !== "string") {
      this._emit("error", { code: "protocol", message: "binary frame received; this client speaks JSON" });
      return;
    }
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      this._emit("error", { code: "protocol", message: "unreadable frame from the server" });
      return;
    }
    if (msg === null || typeof msg !== "object") return;
    switch (msg.op) {
      case "message": {
        const sub = this._subs.get(msg.room);
        if (sub && sub.state === "joined") sub._deliver(msg);
        return;
      }
      case "ack": return this._onAck(msg);
      case "error": return this._onError(msg);
      case "dropped": {
        const sub = this._subs.get(msg.room);
        if (sub && sub.state === "joined") this._recover(sub);
        return;
      }
      case "reset": {
        const sub = this._subs.get(msg.room);
        if (!sub || sub.state === "left") return;
        sub._epoch = typeof msg.epoch === "string" ? msg.epoch : null;
        sub._seq = Number.isInteger(msg.seq) ? msg.seq : null;
        sub._lastSeq = null;
        sub._emit("reset", { room: sub.room, epoch: sub._epoch, seq: sub._seq, reason: "server_reset" });
        return;
      }
      default:
        return;   // pong, and ops a newer server may add
    }
  }

  _onAck(msg) {
    const entry = this._pending.get(msg.id);
    if (!entry) return;
    this._pending.delete(msg.id);
    this._clearTimeout(entry.timer);
    if (entry.kind === "publish") {
      entry.resolve(typeof msg.seq === "number" ? msg.seq : null);
    } else if (entry.kind === "join") {
      this._joined(entry, msg);
    }
  }

  _joined(entry, msg) {
    const sub = entry.sub;
    if (sub._join !== entry || sub.state === "left") return;
    sub._join = null;
    sub._retries = 0;
    const rejoin = sub._everJoined;
    sub._everJoined = true;
    sub.state = "joined";
    const recovered = msg.recovered === true;
    const epoch = typeof msg.epoch === "string" ? msg.epoch : null;
    const seq = Number.isInteger(msg.seq) ? msg.seq : null;
    sub._lastSeq = null;
    if (!recovered) {
      // Continue from the server's top: (epoch, TOP); unknown without history. After a
      // `last` join the latest publication (seq TOP) may follow the ack and is delivered once
      // (Subscription._deliver). The position is NOT TOP-1: when the history keeps nothing
      // the next live message is TOP+1, which must pass the seq == pos+1 rule without a gap
      // (protocol-v2, the coordinator's decision on last:true).
      sub._epoch = seq === null ? null : epoch;
      sub._seq = seq;
      if (entry.last && seq !== null && seq > 0) sub._lastSeq = seq;
    }
    sub._emit("joined", { room: sub.room, recovered, epoch, seq });
    if (!recovered && (entry.since || rejoin)) {
      sub._emit("reset", { room: sub.room, epoch: sub._epoch, seq: sub._seq,
                           reason: entry.since ? "not_recovered" : "no_position" });
    }
  }

  _onError(msg) {
    const entry = msg.id !== undefined ? this._pending.get(msg.id) : undefined;
    const err = { code: msg.code, message: msg.message };
    if (!entry) {
      if (msg.code === "unknown_op" && this._pingAt !== null) {
        // A gateway without the ping op: stop pinging, and with it the liveness deadline.
        this._pingSupported = false;
        if (this._liveTimer !== null) this._clearTimeout(this._liveTimer);
        this._liveTimer = null;
        return;
      }
      this._emit("error", err);
      return;
    }
    this._pending.delete(msg.id);
    this._clearTimeout(entry.timer);
    if (entry.kind === "publish") {
      entry.reject(new GatewayError(msg.code, msg.message));
    } else if (entry.kind === "join") {
      const sub = entry.sub;
      if (sub._join !== entry) return;
      sub._join = null;
      sub._emit("error", Object.assign({ room: sub.room }, err));
      if (PERMANENT_JOIN_ERRORS.has(msg.code)) {
        this._leave(sub, msg.code);
        return;
      }
      sub._retries += 1;
      const o = this._opts;
      const delay = this._random() * Math.min(o.backoffMax, o.backoffInitial * 2 ** (sub._retries - 1));
      sub._retryTimer = this._setTimeout(() => {
        sub._retryTimer = null;
        if (this.state === "connected" && sub.state !== "left") this._sendFrames([this._joinFrame(sub)]);
      }, delay);
    } else {
      this._emit("error", err);   // refresh refused: the connection ends with 4001 at exp
    }
  }
}

export default Client;
