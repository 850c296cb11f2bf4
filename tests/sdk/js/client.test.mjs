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
