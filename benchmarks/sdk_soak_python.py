"""Python half of benchmarks/sdk_soak.py: N gateway.client clients in one process, each joined
to one room, checking every delivered seq against their own bookkeeping (independent of the
SDK's): seq must be last + 1, where `last` is the previous delivered seq or the seq a `reset`
announced. Same protocol as sdk_soak_node.mjs: argv JSON {"urls":[...], "clients":N,
"rooms":[...]}; prints {"ready":true}; stdin "report" -> one JSON line; "exit" closes all.
"""
from __future__ import annotations

import asyncio
import json
import sys

from gateway.client import Client


async def main(cfg: dict) -> None:
    clients = []
    for i in range(cfg["clients"]):
        url = cfg["urls"][i % len(cfg["urls"])]
        room = cfg["rooms"][i % len(cfg["rooms"])]
        client = Client(url, backoff_initial=0.2, backoff_max=2.0, restart_spread=1.0, long_backoff=5.0,
                        ping_interval=5.0, liveness_margin=5.0)
        st = {"url": url, "room": room, "last": None, "delivered": 0, "resets": 0, "violations": [],
              "connects": 0, "disconnects": 0}

        def connected(_ev, st=st):
            st["connects"] += 1

        def disconnected(_ev, st=st):
            st["disconnects"] += 1

        def reset(ev, st=st):
            st["resets"] += 1
            st["last"] = ev.seq

        def joined(ev, st=st):
            if not ev.recovered and st["last"] is None:
                st["last"] = None if ev.epoch is None else ev.seq

        def message(msg, st=st):
            if not msg.seq:
                return
            last = st["last"]
            if last is not None and msg.seq != last + 1 and len(st["violations"]) < 5:
                st["violations"].append([last, msg.seq])
            st["last"] = msg.seq
            st["delivered"] += 1

        client.on("connected", connected)
        client.on("disconnected", disconnected)
        client.start()
        sub = await client.join(room, wait=False)
        sub.on("reset", reset)
        sub.on("joined", joined)
        sub.on("message", message)
        clients.append((client, st))
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "report":
            print(json.dumps([{**st, "state": "connected" if c.state.value == "connected" else c.state.value}
                              for c, st in clients]), flush=True)
        elif line in ("exit", ""):
            await asyncio.gather(*(c.close() for c, _ in clients))
            return


if __name__ == "__main__":
    import uvloop
    uvloop.run(main(json.loads(sys.argv[1])))
