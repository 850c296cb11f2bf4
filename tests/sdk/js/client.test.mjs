// API details of ws-gateway.js the transcripts do not script: argument checks, token expiry
// decoding, listener isolation, settling after close. Fakes only; `node --test tests/sdk/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, GatewayError, tokenExpiry } from "../../../gateway/static/ws-gateway.js";

class QuietSocket {
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; QuietSocket.last = this; }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.readyState = 3; }
}

function client(options = {}) {
  const timers = [];
  return new Client("ws://gw.test/ws", {
    WebSocket: QuietSocket, fetch: null, pingInterval: 0,
    setTimeout: (fn, ms) => timers.push({ fn, ms }), clearTimeout: () => {},
    ...options,
  });
}

test("tokenExpiry reads exp from a JWT payload and nothing else", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  assert.equal(tokenExpiry(`${b64({ alg: "HS256" })}.${b64({ sub: "u", exp: 1700000123 })}.sig`), 1700000123);
  assert.equal(tokenExpiry(`${b64({})}.${b64({ sub: "u" })}.sig`), null);
  assert.equal(tokenExpiry("not-a-jwt"), null);
  assert.equal(tokenExpiry("a.%%%.c"), null);
  assert.equal(tokenExpiry(undefined), null);
});

test("without a WebSocket class the constructor says how to get one", () => {
  const saved = globalThis.WebSocket;
  try {
    globalThis.WebSocket = undefined;
    assert.throws(() => new Client("ws://gw.test/ws"), /--experimental-websocket/);
  } finally {
    globalThis.WebSocket = saved;
  }
});

test("the token goes into the query string, next to existing parameters", () => {
  const c = client({ token: "a.b.c" });
  assert.equal(QuietSocket.last.url, "ws://gw.test/ws?token=a.b.c");
  c.close();
  const d = new Client("ws://gw.test/ws?x=1", { WebSocket: QuietSocket, token: "t", pingInterval: 0 });
  assert.equal(QuietSocket.last.url, "ws://gw.test/ws?x=1&token=t");
  d.close();
});

test("bad arguments are refused clearly", async () => {
  const c = client();
  assert.throws(() => c.join(""), TypeError);
  assert.throws(() => c.join(42), TypeError);
  const sub = c.join("r");
  assert.throws(() => { sub.position = { epoch: "e", seq: -1 }; }, TypeError);
  assert.throws(() => { sub.position = { epoch: 5, seq: 1 }; }, TypeError);
  sub.position = { epoch: "e", seq: 3 };
  assert.deepEqual(sub.position, { epoch: "e", seq: 3 });
  sub.position = null;
  assert.equal(sub.position, null);
  await assert.rejects(c.publish("", 1), TypeError);
  assert.throws(() => sub.on("message", "not a function"), TypeError);
  c.close();
});

test("a throwing listener neither stops the others nor the client; off() removes", async () => {
  const c = client();
  const seen = [];
  const thrown = [];
  // The SDK re-throws a listener's exception from a microtask (reported like an uncaught
  // exception in an event handler); capture it here instead of crashing the test runner.
  const savedQueue = globalThis.queueMicrotask;
  globalThis.queueMicrotask = (fn) => { try { fn(); } catch (err) { thrown.push(err.message); } };
  try {
    const first = () => { throw new Error("app bug"); };
    const second = () => seen.push("second");
    c.on("connected", first).on("connected", second);
    QuietSocket.last.readyState = 1;
    QuietSocket.last.onopen();
    c.off("connected", second);
    QuietSocket.last.onclose({ code: 1006, reason: "" });
    assert.deepEqual(seen, ["second"]);
    assert.deepEqual(thrown, ["app bug"]);       // reported, as an event handler's throw is
    assert.equal(c.state, "disconnected");
  } finally {
    globalThis.queueMicrotask = savedQueue;
    c.close();
  }
});

test("after close() joins throw and publishes reject with code closed", async () => {
  const c = client();
  const pending = c.publish("r", 1);
  c.close();
  await assert.rejects(pending, (err) => err instanceof GatewayError && err.code === "closed");
  await assert.rejects(c.publish("r", 2), (err) => err.code === "closed");
  assert.throws(() => c.join("r"), (err) => err.code === "closed");
  c.close();   // twice is harmless
});

// A clock whose timers fire only when the test says so, and as late as it says: browsers run
// the timers of background tabs late (Chrome: once a minute after 5 minutes hidden).
function lateClock() {
  const clock = { now: 0, timers: [], seq: 0 };
  clock.setTimeout = (fn, ms) => { const t = { fn, due: clock.now + ms, id: ++clock.seq }; clock.timers.push(t); return t; };
  clock.clearTimeout = (t) => { clock.timers = clock.timers.filter((x) => x !== t); };
  /** Move to `at` and fire the earliest timer due by then, at `at` (late if it was due earlier). */
  clock.fireAt = (at) => {
    clock.now = at;
    const due = clock.timers.filter((t) => t.due <= at).sort((a, b) => a.due - b.due || a.id - b.id)[0];
    assert.ok(due, `no timer due by ${at}`);
    clock.timers = clock.timers.filter((t) => t !== due);
    due.fn();
  };
  return clock;
}

function liveClient(clock) {
  class Socket extends QuietSocket {
    close(code) { this.closedWith = code; this.readyState = 3; }
  }
  const c = new Client("ws://gw.test/ws", {
    WebSocket: Socket, fetch: null, pingInterval: 20000, livenessMargin: 10000, backoffInitial: 100,
    now: () => clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, random: () => 0.5,
  });
  const open = () => { const ws = QuietSocket.last; ws.readyState = 1; ws.onopen(); return ws; };
  return { c, open };
}

test("a liveness check that runs late pings and waits; it does not drop an idle, healthy connection", () => {
  const clock = lateClock();
  const { c, open } = liveClient(clock);
  const ws = open();
  const gone = [];
  c.on("disconnected", (d) => gone.push(d.code));
  // Due at 20 s, run at 60 s (throttled tab; the room was silent and the server's WebSocket
  // pings are invisible to scripts): 60 s of silence is not proof of a dead connection.
  clock.fireAt(60000);
  assert.deepEqual(ws.sent, [{ op: "ping" }]);
  assert.equal(ws.closedWith, undefined);
  assert.deepEqual(gone, []);
  ws.onmessage({ data: JSON.stringify({ op: "pong" }) });
  clock.fireAt(130000);               // late again: the pong answered the ping, so ping anew
  assert.deepEqual(ws.sent, [{ op: "ping" }, { op: "ping" }]);
  assert.equal(c.state, "connected");
  // Unanswered: closed (3008) livenessMargin after that ping, even when the check runs late.
  clock.fireAt(200000);
  assert.equal(ws.closedWith, 3008);
  assert.deepEqual(gone, [3008]);
  c.close();
});

test("on time, an unanswered ping closes at pingInterval + livenessMargin of silence", () => {
  const clock = lateClock();
  const { c, open } = liveClient(clock);
  const ws = open();
  clock.fireAt(20000);
  assert.deepEqual(ws.sent, [{ op: "ping" }]);
  ws.onmessage({ data: JSON.stringify({ op: "message", room: "r", data: 1, seq: 1 }) });  // any frame counts
  clock.fireAt(30000);
  assert.equal(ws.closedWith, undefined);
  clock.fireAt(40000);                // 20 s after that frame: the next ping
  assert.equal(ws.sent.length, 2);
  assert.deepEqual(clock.timers.map((t) => t.due), [50000]);
  assert.equal(ws.closedWith, undefined);
  clock.fireAt(50000);
  assert.equal(ws.closedWith, 3008);
  c.close();
});

test("a gateway without the ping op stops pings on that connection only; the next one pings again", () => {
  const clock = lateClock();
  const { c, open } = liveClient(clock);
  let ws = open();
  clock.fireAt(20000);
  ws.onmessage({ data: JSON.stringify({ op: "error", code: "unknown_op", message: "unknown op 'ping'" }) });
  assert.deepEqual(clock.timers, []);  // no liveness deadline against a gateway that cannot pong
  ws.onclose({ code: 1006, reason: "" });
  clock.fireAt(clock.timers[0].due);   // the reconnect
  ws = open();
  clock.fireAt(clock.now + 20000);
  assert.deepEqual(ws.sent, [{ op: "ping" }]);
  c.close();
});
