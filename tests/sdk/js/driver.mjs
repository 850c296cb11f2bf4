// A ws-gateway.js client remote-controlled over stdin/stdout for the end-to-end tests
// (tests/system/test_sdk_js_e2e.py): one JSON command per input line, one JSON event per
// output line. Not a test file itself (node --test does not pick it up).
//
// commands: {"cmd":"new","url":U,"options":{...},"getToken":bool}  {"cmd":"token","call":N,"token":T|"error":E}
//           {"cmd":"join","room":R,"since":P?,"last":bool?}  {"cmd":"leave","room":R}  {"cmd":"position","room":R}
//           {"cmd":"publish","room":R,"data":X,"key":K?,"tag":T}  {"cmd":"block","ms":MS}  {"cmd":"close"}
// events:   {"ev":"connect","url":U} for every socket the SDK opens, {"ev":"get_token","call":N},
//           client and subscription events ({"ev":name,"room":R?,...data}), {"ev":"settle",...},
//           {"ev":"position",...}
import { createInterface } from "node:readline";
import { Client } from "../../../gateway/static/ws-gateway.js";

const out = (doc) => process.stdout.write(JSON.stringify(doc) + "\n");
const tokenCalls = new Map();
let calls = 0;
let client = null;
const subs = new Map();

class LoggingWebSocket extends globalThis.WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    out({ ev: "connect", url });
  }
}

function plain(data) {
  const doc = {};
  for (const [k, v] of Object.entries(data || {})) if (!(v instanceof Error)) doc[k] = v;
  return doc;
}

const handlers = {
  new(c) {
    const options = Object.assign({}, c.options, { WebSocket: LoggingWebSocket });
    if (c.getToken) {
      options.getToken = () => {
        const call = ++calls;
        out({ ev: "get_token", call });
        return new Promise((resolve, reject) => tokenCalls.set(call, { resolve, reject }));
      };
    }
    client = new Client(c.url, options);
    for (const name of ["connected", "disconnected", "error"]) {
      client.on(name, (data) => out(Object.assign(plain(data), { ev: name })));
    }
  },
  token(c) {
    const waiter = tokenCalls.get(c.call);
    tokenCalls.delete(c.call);
    if (c.error) waiter.reject(new Error(c.error));
    else waiter.resolve(c.token);
  },
  join(c) {
    const sub = client.join(c.room, c.since ? { since: c.since } : { last: Boolean(c.last) });
    if (subs.get(c.room) === sub) return;
    subs.set(c.room, sub);
    for (const name of ["joined", "message", "reset", "left", "error"]) {
      sub.on(name, (data) => out(Object.assign(plain(data), { ev: name, room: c.room })));
    }
  },
  leave(c) { subs.get(c.room).leave(); },
  position(c) { out({ ev: "position", room: c.room, position: subs.get(c.room).position }); },
  publish(c) {
    client.publish(c.room, c.data, c.key ? { idempotencyKey: c.key } : {}).then(
      (seq) => out({ ev: "settle", tag: c.tag, seq }),
      (err) => out({ ev: "settle", tag: c.tag, error: err.code }),
    );
  },
  block(c) {
    // Stop reading (the event loop is busy) so the gateway's queue for us fills: slow consumer.
    const end = Date.now() + c.ms;
    while (Date.now() < end) { /* busy */ }
    out({ ev: "unblocked" });
  },
  close() { client.close(); },
  exit() { process.exit(0); },
};

createInterface({ input: process.stdin }).on("line", (line) => {
  if (!line.trim()) return;
  const c = JSON.parse(line);
  try {
    handlers[c.cmd](c);
  } catch (err) {
    out({ ev: "driver_error", cmd: c.cmd, message: String(err && err.stack || err) });
  }
});
out({ ev: "ready" });
