"""ws-gateway's load tool: load-test any WebSocket server from the command line.

    python -m benchmarks.loadtool echo --url ws://127.0.0.1:8080/echo --connections 100 --inflight 16
    python -m benchmarks.loadtool handshake --url ws://127.0.0.1:8080/echo --concurrency 50
    python -m benchmarks.loadtool compare --a "CMD {port}" --b "CMD {port}" --mode echo ...

Module map (one job each):
  cli.py        argument parsing, human-readable output and the `RESULT {json}` line
  modes.py      the Mode interface; registry.py lists the modes (one line per mode)
  runner.py     runs a mode in N worker processes in lock-step and merges their results
  wsclient.py   URL parsing, the HTTP upgrade handshake, client frame helpers, socket setup
  clientprotocol.py  the client connection life cycle the modes share (close handshake, lost)
  lowwater.py   the lowest k every subscriber of a room has (time to last subscriber)
  echo.py       echo mode: K messages in flight per connection
  handshake.py  handshake mode: open + close WebSockets as fast as possible
  stats.py      per-worker results, merging and percentiles
  cpu.py        client and server CPU use during the measurement window; the CLIENT-BOUND rule
  fastclient.py which client runs a mode (--client-impl): the compiled loops or asyncio
  _fastclient.pyx  the compiled measurement loops (epoll + non-blocking sockets) of the
                handshake, fanout and echo modes; built by `setup.py build_ext --inplace`
  servers.py    start a server command on a free port, wait for it, stop it (for compare)
  compare.py    A/B comparison of two server commands over alternating rounds

When `_fastclient` is built, handshake, fanout and echo measure in its C loops (the
asyncio side opens, joins and closes the connections); otherwise, and with
`--client-impl python`, the client is pure asyncio.Protocol on uvloop (no WebSocket
library on the hot path) using gateway_ext's FrameParser / encode_frame.
Imports gateway_ext only, never `gateway` (the tool must be able to test any server).
"""
