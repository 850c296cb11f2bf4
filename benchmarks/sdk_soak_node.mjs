// Node half of benchmarks/sdk_soak.py: N ws-gateway.js clients in one process, each joined to
// one room, checking every delivered seq against its own bookkeeping (independent of the SDK's):
// seq must be last+1, where `last` is the previous delivered seq or the seq a `reset` announced.
// argv: JSON {"urls":[...], "clients":N, "rooms":[...]}. stdin "report" -> one JSON line.
import { createInterface } from "node:readline";
import { Client } from "../gateway/static/ws-gateway.js";

const cfg = JSON.parse(process.argv[2]);
const clients = [];
for (let i = 0; i < cfg.clients; i++) {
  const url = cfg.urls[i % cfg.urls.length];
  const room = cfg.rooms[i % cfg.rooms.length];
  const c = new Client(url, { backoffInitial: 200, backoffMax: 2000, restartSpread: 1000, longBackoff: 5000,
                              pingInterval: 5000, livenessMargin: 5000 });
  const st = { url, room, last: null, delivered: 0, resets: 0, violations: [], connects: 0, disconnects: 0 };
  c.on("connected", () => { st.connects++; });
  c.on("disconnected", () => { st.disconnects++; });
  const sub = c.join(room);
  sub.on("reset", ({ seq }) => { st.resets++; st.last = seq ?? null; });
  sub.on("joined", ({ recovered, epoch, seq }) => { if (!recovered && st.last === null) st.last = epoch === null ? null : seq; });
  sub.on("message", ({ seq }) => {
    if (!seq) return;
    if (st.last !== null && seq !== st.last + 1 && st.violations.length < 5) st.violations.push([st.last, seq]);
    st.last = seq;
    st.delivered++;
  });
  clients.push({ c, st });
}

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim() === "report") {
    process.stdout.write(JSON.stringify(clients.map(({ c, st }) => ({ ...st, state: c.state }))) + "\n");
  } else if (line.trim() === "exit") {
    for (const { c } of clients) c.close();
    process.exit(0);
  }
});
process.stdout.write(JSON.stringify({ ready: true }) + "\n");
