// Runs every tests/sdk/transcripts/*.json against gateway/static/ws-gateway.js with a fake
// WebSocket, a fake clock, a fake random source and a fake fetch (the format is
// tests/sdk/transcripts/README.md). `node --test tests/sdk/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setImmediate as tick } from "node:timers/promises";

import { Client } from "../../../gateway/static/ws-gateway.js";

const here = dirname(fileURLToPath(import.meta.url));
const dir = join(here, "..", "transcripts");

const OPTION_NAMES = {
  token: "token",
  backoff_initial_ms: "backoffInitial",
  backoff_max_ms: "backoffMax",
  restart_spread_ms: "restartSpread",
  long_backoff_ms: "longBackoff",
  ping_interval_ms: "pingInterval",
  liveness_margin_ms: "livenessMargin",
  command_timeout_ms: "commandTimeout",
  refresh_margin_ms: "refreshMargin",
};

// -- matching (README "Matching") ----------------------------------------------------------

function isObject(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }

function match(expected, actual, caps, subset, path = "") {
  if (expected === "*") {
    if (actual === undefined) throw new Error(`${path || "value"}: expected a value, got none`);
    return;
  }
  if (typeof expected === "string" && expected.startsWith("$")) {
    const name = expected.slice(1);
    if (actual === undefined) throw new Error(`${path}: expected ${expected}, got none`);
    if (name in caps) assert.deepEqual(actual, caps[name], `${path}: ${expected} was ${JSON.stringify(caps[name])}`);
    else caps[name] = actual;
    return;
  }
  if (Array.isArray(expected)) {
    if (!Array.isArray(actual) || actual.length !== expected.length) {
      throw new Error(`${path}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
    }
    expected.forEach((e, i) => match(e, actual[i], caps, subset, `${path}[${i}]`));
    return;
  }
  if (isObject(expected)) {
    if (!isObject(actual) && !(actual instanceof Error)) throw new Error(`${path}: expected an object, got ${JSON.stringify(actual)}`);
    if (!subset) {
      const extra = Object.keys(actual).filter((k) => actual[k] !== undefined && !(k in expected));
      if (extra.length) throw new Error(`${path}: unexpected keys ${extra} in ${JSON.stringify(actual)}`);
    }
    for (const [k, e] of Object.entries(expected)) match(e, actual[k], caps, subset, `${path}.${k}`);
    return;
  }
  if (expected !== actual) throw new Error(`${path || "value"}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
}

function matchOutput(exp, out, caps) {
  const kind = Object.keys(exp).find((k) => ["connect", "send", "close", "get_token", "event", "settle"].includes(k));
  if (!(kind in out)) throw new Error(`expected ${JSON.stringify(exp)}, got ${describe(out)}`);
  switch (kind) {
    case "connect": case "close": case "get_token":
      return match(exp[kind], out[kind], caps, false, kind);
    case "send":
      return match(exp.send, out.send, caps, false, "send");
    case "event":
      if (exp.event !== out.event || (exp.room ?? null) !== (out.room ?? null)) {
        throw new Error(`expected ${JSON.stringify(exp)}, got ${describe(out)}`);
      }
      if (exp.data !== undefined) match(exp.data, out.data, caps, true, `event ${exp.event}`);
      return;
    case "settle":
      if (exp.settle !== out.settle) throw new Error(`expected ${JSON.stringify(exp)}, got ${describe(out)}`);
      if ("value" in exp) {
        if (!("value" in out)) throw new Error(`${exp.settle}: expected value ${JSON.stringify(exp.value)}, got error ${out.error && out.error.code}`);
        return match(exp.value, out.value, caps, false, `settle ${exp.settle}`);
      }
      if (!("error" in out)) throw new Error(`${exp.settle}: expected an error, got value ${JSON.stringify(out.value)}`);
      return match(exp.error, out.error, caps, true, `settle ${exp.settle}`);
  }
}

function describe(out) {
  if (out && out.error instanceof Error) return JSON.stringify({ ...out, error: { code: out.error.code, message: out.error.message } });
  return JSON.stringify(out);
}

function substitute(value, caps) {
  if (typeof value === "string" && value.startsWith("$")) {
    const name = value.slice(1);
    if (!(name in caps)) throw new Error(`server frame uses ${value} before it was captured`);
    return caps[name];
  }
  if (Array.isArray(value)) return value.map((v) => substitute(v, caps));
  if (isObject(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, substitute(v, caps)]));
  return value;
}

// -- the fakes -------------------------------------------------------------------------------

class FakeClock {
  constructor(start) {
    this.t = start;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.t;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { due: this.t + Math.max(0, Number(ms) || 0), fn, id });
      return id;
    };
    this.clearTimeout = (id) => { this.timers.delete(id); };
  }

  next() {
    let best = null;
    for (const timer of this.timers.values()) {
      if (!best || timer.due < best.due || (timer.due === best.due && timer.id < best.id)) best = timer;
    }
    return best;
  }
}

async function settle() {
  // No real time passes: just let promise chains and queued callbacks run out.
  for (let i = 0; i < 10; i++) await tick();
}

class Run {
  constructor(doc) {
    this.doc = doc;
    this.outputs = [];
    this.caps = {};
    this.sockets = [];
    this.http = null;            // what the fake fetch answers: a status, "unreachable" or null
    this.clock = new FakeClock(doc.start ?? 1700000000000);
    this.subs = new Map();
    this.problems = [];
    const run = this;
    const outputs = this.outputs;

    class FakeWebSocket {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.batch = null;
        outputs.push({ connect: url });
        run.sockets.push(this);
      }
      send(text) {
        if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
        if (typeof text !== "string") run.problems.push("the SDK sent a non-text frame");
        if (!this.batch) {
          // One write = everything sent before the next microtask checkpoint.
          this.batch = [];
          outputs.push({ send: this.batch });
          queueMicrotask(() => { this.batch = null; });
        }
        this.batch.push(JSON.parse(text));
      }
      close(code) {
        if (this.readyState >= 2) return;
        this.readyState = 2;
        outputs.push({ close: code ?? 1000 });
      }
    }

    const values = doc.random ?? [0.5];
    let r = 0;
    const tokens = doc.tokens ?? [];
    let t = 0;
    const options = {
      WebSocket: FakeWebSocket,
      now: this.clock.now,
      setTimeout: this.clock.setTimeout,
      clearTimeout: this.clock.clearTimeout,
      random: () => values[Math.min(r++, values.length - 1)],
      fetch: async () => {
        if (typeof run.http === "number") return { status: run.http };
        throw new TypeError("fetch failed");
      },
    };
    for (const [key, value] of Object.entries(doc.options ?? {})) {
      if (key === "get_token") {
        if (value) {
          options.getToken = async () => {
            outputs.push({ get_token: true });
            if (t >= tokens.length) {
              run.problems.push(`getToken called ${t + 1} times; the transcript has ${tokens.length} tokens`);
              throw new Error("no more tokens");
            }
            const token = tokens[t++];
            if (isObject(token) && "error" in token) throw new Error(token.error);
            return token;
          };
        }
      } else if (key in OPTION_NAMES) {
        options[OPTION_NAMES[key]] = value;
      } else {
        throw new Error(`unknown transcript option ${key}`);
      }
    }
    this.client = new Client(doc.url, options);
    for (const name of ["connected", "disconnected", "error"]) {
      this.client.on(name, (data) => outputs.push({ event: name, data }));
    }
  }

  get socket() {
    const ws = this.sockets[this.sockets.length - 1];
    if (!ws) throw new Error("no socket: the SDK has not connected");
    return ws;
  }

  watch(sub) {
    if (this.subs.get(sub.room) === sub) return;
    this.subs.set(sub.room, sub);
    for (const name of ["joined", "message", "reset", "left", "error"]) {
      sub.on(name, (data) => this.outputs.push({ event: name, room: sub.room, data }));
    }
  }

  async fire(timer) {
    this.clock.timers.delete(timer.id);
    this.clock.t = Math.max(this.clock.t, timer.due);
    timer.fn();
    await settle();
  }

  async step(s) {
    if ("app" in s) return this.app(s);
    if ("server" in s) return this.server(s);
    if ("advance" in s) {
      const target = this.clock.t + s.advance;
      for (let timer = this.clock.next(); timer && timer.due <= target; timer = this.clock.next()) await this.fire(timer);
      this.clock.t = target;
      return;
    }
    if ("expect" in s) {
      const got = this.outputs.splice(0);
      const exp = s.expect;
      const show = () => `expected ${JSON.stringify(exp)}\n     got ${"[" + got.map(describe).join(", ") + "]"}`;
      if (got.length !== exp.length) throw new Error(`${got.length} outputs, ${exp.length} expected\n${show()}`);
      exp.forEach((e, i) => {
        try { matchOutput(e, got[i], this.caps); } catch (err) { throw new Error(`output ${i}: ${err.message}\n${show()}`); }
      });
      return;
    }
    if ("await" in s) {
      if (this.outputs.length) throw new Error(`await: outputs pending before it: ${this.outputs.map(describe)}`);
      const start = this.clock.t;
      const [lo, hi] = s.within;
      for (;;) {
        const timer = this.clock.next();
        if (!timer || timer.due > start + hi) {
          throw new Error(`await ${JSON.stringify(s.await)}: nothing happened within ${hi} ms (next timer: ${timer ? timer.due - start : "none"})`);
        }
        await this.fire(timer);
        if (this.outputs.length) {
          const elapsed = this.clock.t - start;
          const out = this.outputs.shift();
          matchOutput(s.await, out, this.caps);
          if (elapsed < lo || elapsed > hi) throw new Error(`await ${JSON.stringify(s.await)}: came after ${elapsed} ms, not within [${lo}, ${hi}]`);
          return;
        }
      }
    }
    if ("check" in s) {
      if (s.check === "position") {
        const sub = this.subs.get(s.room);
        assert.ok(sub, `no subscription for ${s.room}`);
        assert.deepEqual(sub.position, s.position, `position of ${s.room}`);
      } else if (s.check === "state") {
        assert.equal(this.client.state, s.value, "client state");
      } else {
        throw new Error(`unknown check ${s.check}`);
      }
      return;
    }
    throw new Error(`unknown step ${JSON.stringify(s)}`);
  }

  async app(s) {
    const c = this.client;
    switch (s.app) {
      case "join": {
        const opts = {};
        if (s.since) opts.since = s.since;
        if (s.last) opts.last = true;
        this.watch(c.join(s.room, opts));
        break;
      }
      case "leave": this.subs.get(s.room).leave(); break;
      case "set_position": this.subs.get(s.room).position = s.position; break;
      case "close": c.close(); break;
      case "publish": {
        const label = s.as;
        c.publish(s.room, s.data, s.key !== undefined ? { idempotencyKey: s.key } : {}).then(
          (value) => this.outputs.push({ settle: label, value }),
          (error) => this.outputs.push({ settle: label, error }),
        );
        break;
      }
      default: throw new Error(`unknown app step ${s.app}`);
    }
    await settle();
  }

  async server(s) {
    switch (s.server) {
      case "accept": {
        const ws = this.socket;
        ws.readyState = 1;
        ws.onopen && ws.onopen({ type: "open" });
        break;
      }
      case "refuse":
      case "unreachable": {
        const ws = this.socket;
        this.http = s.server === "refuse" ? s.status : "unreachable";
        ws.readyState = 3;
        ws.onerror && ws.onerror({ type: "error" });
        ws.onclose && ws.onclose({ type: "close", code: 1006, reason: "", wasClean: false });
        break;
      }
      case "send":
        for (const frame of s.frames) {
          const ws = this.socket;
          ws.onmessage && ws.onmessage({ type: "message", data: JSON.stringify(substitute(frame, this.caps)) });
          await settle();
        }
        break;
      case "close":
      case "drop": {
        const ws = this.socket;
        ws.readyState = 3;
        const code = s.server === "drop" ? 1006 : s.code;
        ws.onclose && ws.onclose({ type: "close", code, reason: s.reason ?? "", wasClean: s.server !== "drop" });
        break;
      }
      default: throw new Error(`unknown server step ${s.server}`);
    }
    await settle();
  }
}

const files = readdirSync(dir).filter((f) => f.endsWith(".json")).sort();
assert.ok(files.length > 0, `no transcripts in ${dir}`);

for (const file of files) {
  const doc = JSON.parse(readFileSync(join(dir, file), "utf8"));
  test(`transcript ${doc.name}: ${doc.description}`, async () => {
    const run = new Run(doc);
    try {
      await settle();
      for (const [i, s] of doc.steps.entries()) {
        try {
          await run.step(s);
        } catch (err) {
          err.message = `${file} step ${i} ${JSON.stringify(s)}:\n${err.message}`;
          throw err;
        }
      }
      assert.deepEqual(run.problems, [], "problems seen by the fakes");
    } finally {
      run.client.close();
    }
  });
}
