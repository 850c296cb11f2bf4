// ws-gateway demo client: the browser's native WebSocket speaking the /ws JSON protocol
// (gateway/rooms/commands.py). Joins rooms, publishes, shows messages, and reconnects with
// exponential backoff plus jitter, re-joining its rooms after each reconnect.
// A `?token=...` in the page URL is passed on as the `token` query parameter of the
// WebSocket URL (the auth layer reads it there).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const pageParams = new URLSearchParams(location.search);
  const token = pageParams.get("token");
  const wsUrl = (() => {
    const url = new URL("/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (token) url.searchParams.set("token", token);
    return url.toString();
  })();

  const rooms = new Set();        // rooms to (re-)join after every reconnect
  const pending = new Map();      // request id -> description, for acks and errors
  let ws = null;
  let nextId = 1;
  let attempt = 0;
  let reconnectTimer = null;

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

  function send(op, fields, what) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      log(`not connected: ${what} not sent`, "error");
      return;
    }
    const id = nextId++;
    pending.set(id, what);
    ws.send(JSON.stringify(Object.assign({ op, id }, fields)));
  }

  function connect() {
    reconnectTimer = null;
    setStatus(false, attempt ? `reconnecting (attempt ${attempt})` : "connecting");
    ws = new WebSocket(wsUrl);
    ws.onopen = () => {
      attempt = 0;
      window.wsGatewayDemo.extensions = ws.extensions;   // "permessage-deflate; ..." when negotiated
      setStatus(true, "");
      log("connected", "system");
      for (const room of rooms) send("join", { room }, `join ${room}`);
    };
    ws.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { log(`unreadable frame: ${event.data}`, "error"); return; }
      if (msg.op === "message") {
        const text = typeof msg.data === "object" && msg.data !== null && "text" in msg.data ? msg.data.text : JSON.stringify(msg.data);
        log(`[${msg.room} #${msg.seq}] ${text}`);
      } else if (msg.op === "ack") {
        const what = pending.get(msg.id);
        pending.delete(msg.id);
        if (what && !what.startsWith("publish")) log(`ok: ${what}`, "system");
      } else if (msg.op === "error") {
        const what = pending.get(msg.id) || "request";
        pending.delete(msg.id);
        log(`error (${msg.code}) for ${what}: ${msg.message}`, "error");
      } else if (msg.op === "dropped") {
        log(`missed ${msg.count} message(s) in ${msg.room} (reading too slowly)`, "error");
      }
    };
    ws.onclose = (event) => {
      setStatus(false, `closed (${event.code}${event.reason ? ": " + event.reason : ""})`);
      pending.clear();
      scheduleReconnect(event.code);
    };
    ws.onerror = () => { /* onclose follows and schedules the retry */ };
  }

  function scheduleReconnect(code) {
    if (reconnectTimer) return;
    // Exponential backoff with full jitter, capped: many clients reconnecting after a
    // restart must not all arrive in the same instant. Policy closes (4003) wait longer.
    attempt += 1;
    const base = code === 4003 ? 5000 : 250;
    const delay = Math.random() * Math.min(30000, base * 2 ** Math.min(attempt, 7));
    $("detail").textContent += ` — retry in ${(delay / 1000).toFixed(1)} s`;
    reconnectTimer = setTimeout(connect, delay);
  }

  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const room = $("room").value.trim();
    if (!room) return;
    rooms.add(room);
    send("join", { room }, `join ${room}`);
  });
  $("leave").addEventListener("click", () => {
    const room = $("room").value.trim();
    rooms.delete(room);
    send("leave", { room }, `leave ${room}`);
  });
  $("publish-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const room = $("room").value.trim();
    const text = $("text").value;
    if (!room || !text) return;
    send("publish", { room, data: { text } }, `publish to ${room}`);
    $("text").value = "";
  });

  window.wsGatewayDemo = { url: wsUrl, rooms };   // for tests and curious developers
  connect();
})();
