// ws-gateway demo page, built on the JS SDK (/ws-gateway.js): joins rooms, publishes, shows
// messages, and leaves reconnecting, re-joining and recovering to the SDK. The rooms and each
// room's position are kept in sessionStorage, so a reload resumes where the page was: the
// re-join carries `since` and the gateway replays what the page missed (or the page says
// "reset" when history could not cover the gap). On a first visit (nothing stored for this
// tab) the page joins the room in the #room field (`lobby`) by itself, so a new user sees a
// live room at once; once the tab has state, only its stored rooms are re-joined (a room the
// user left stays left across reloads).
// A `?token=...` in the page URL is passed on as the `token` query parameter of the
// WebSocket URL (the auth layer reads it there).
import { Client } from "/ws-gateway.js";

const $ = (id) => document.getElementById(id);
const STORE = "ws-gateway-demo";
const pageParams = new URLSearchParams(location.search);
const token = pageParams.get("token");
const wsUrl = (() => {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  return url.toString();
})();

function log(text, kind) {
  const li = document.createElement("li");
  li.textContent = text;
  if (kind) li.className = kind;
  $("log").prepend(li);
  while ($("log").children.length > 200) $("log").lastChild.remove();
}

function setStatus(open, detail) {
  $("status").textContent = open ? "open" : "closed";
  $("status").className = open ? "open" : "closed";
  $("detail").textContent = detail || "";
  document.body.dataset.state = open ? "open" : "closed";
}

// sessionStorage: {rooms: {name: position|null}}; survives a reload of this tab only.
// null: nothing stored yet (this tab's first visit).
function load() {
  try {
    const doc = JSON.parse(sessionStorage.getItem(STORE));
    return doc && typeof doc.rooms === "object" && doc.rooms !== null ? doc : null;
  } catch {
    return null;
  }
}
const saved = load();
function save() {
  const rooms = {};
  for (const [name, sub] of client.subscriptions) rooms[name] = sub.position;
  sessionStorage.setItem(STORE, JSON.stringify({ rooms }));
}

// The SDK's socket stays private; this subclass lets tests see the negotiated extensions.
class DemoSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    this.addEventListener("open", () => { window.wsGatewayDemo.extensions = this.extensions; });
  }
}

const client = new Client(wsUrl, { WebSocket: DemoSocket });
window.wsGatewayDemo = { url: wsUrl, client, extensions: null };   // for tests and curious developers
setStatus(false, "connecting");

client.on("connected", () => { setStatus(true, ""); log("connected", "system"); });
client.on("disconnected", ({ code, reason, reconnect }) => {
  setStatus(false, `closed (${code}${reason ? ": " + reason : ""})${reconnect ? " — reconnecting" : ""}`);
  log(`disconnected (${code})${reconnect ? ", reconnecting" : ", stopped"}`, reconnect ? "system" : "error");
});
client.on("error", ({ code, message }) => log(`error (${code}): ${message || ""}`, "error"));

function join(room, since) {
  const sub = client.join(room, since ? { since } : {});
  if (sub._demoWired) return sub;
  sub._demoWired = true;
  sub.on("joined", ({ recovered, epoch, seq }) => {
    log(`ok: join ${room}`, "system");
    if (recovered) log(`resumed ${room} from #${sub.position.seq} (server at #${seq}, epoch ${epoch})`, "system");
    save();
  });
  sub.on("message", ({ data, seq }) => {
    const text = typeof data === "object" && data !== null && "text" in data ? data.text : JSON.stringify(data);
    log(`[${room} #${seq}] ${text}`);
    save();
  });
  sub.on("reset", ({ reason }) => { log(`reset ${room} (${reason}): messages may be missing; reload state`, "error"); save(); });
  sub.on("error", ({ code, message }) => log(`error (${code}) for join ${room}: ${message}`, "error"));
  sub.on("left", ({ reason }) => { log(`left ${room}${reason === "app" ? "" : " (" + reason + ")"}`, "system"); save(); });
  save();
  return sub;
}

if (saved === null) {
  const room = $("room").value.trim() || "lobby";
  log(`first visit: joining ${room}`, "system");
  join(room);
} else {
  for (const [room, position] of Object.entries(saved.rooms)) join(room, position || undefined);
}

$("join-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const room = $("room").value.trim();
  if (room) join(room);
});
$("leave").addEventListener("click", () => client.leave($("room").value.trim()));
$("publish-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const room = $("room").value.trim();
  const text = $("text").value;
  if (!room || !text) return;
  $("text").value = "";
  try {
    await client.publish(room, { text }, { idempotencyKey: crypto.randomUUID ? crypto.randomUUID() : undefined });
  } catch (err) {
    log(`error (${err.code}) for publish to ${room}: ${err.message}`, "error");
  }
});
