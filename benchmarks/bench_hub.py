"""Hub micro-benchmark: the cost of one fan-out pass for 1 .. 10,000 fake members.

    python benchmarks/bench_hub.py [--members 1,10,100,1000,10000] [--window 1,32] [--seconds 0.5]

No sockets and no event loop: `handle_publication` is called W times (one loop pass's
publications: W frames encoded once each), then the hub's per-pass `_flush` delivers the
joined batch to every member. Members are fake (`deliver` appends to a list that is
cleared each pass, or does nothing), so the numbers are the hub's own Python cost:

  ns/member    per member per pass (the loop + one deliver call; what Cython could shrink)
  ns/delivery  per (member, publication): ns/member / W -- batching divides it by W
  encode us    building and joining the W frames (per pass, independent of members)

Compare ns/member with the kernel's cost of one socket write (~2-20 us on loopback): as
long as it is far below, the Python loop is not the limit and Cython is not worth it.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.broker.memory import MemoryBroker  # noqa: E402
from gateway.rooms.hub import Hub, Room  # noqa: E402


class _NoLoop:
    """call_soon is recorded, not run: the benchmark calls the hub's flush itself."""

    def call_soon(self, fn, *args):
        return None

    def create_task(self, coro):  # pragma: no cover - leaves do not happen here
        coro.close()


class CountingMember:
    """The cheapest realistic member: keeps a reference to the batch, as a transport would."""

    __slots__ = ("msgpack", "last", "__weakref__")

    def __init__(self) -> None:
        self.msgpack = False
        self.last = None

    def deliver(self, room, frames, batch) -> None:
        self.last = batch


class SessionLikeMember:
    """Mimics Session.deliver's fast path: a few attribute checks, then one write call."""

    __slots__ = ("msgpack", "queue", "closed", "conn", "__weakref__")

    class _Conn:
        __slots__ = ("paused", "_corked", "out")

        def __init__(self) -> None:
            self.paused = False
            self._corked = False
            self.out = None

        def send_shared(self, data) -> None:
            if self._corked:
                return
            self.out = data

    def __init__(self) -> None:
        self.msgpack = False
        self.queue = None
        self.closed = False
        self.conn = self._Conn()

    def deliver(self, room, frames, batch) -> None:
        conn = self.conn
        if self.queue is None and not conn.paused:
            if not self.closed:
                conn.send_shared(batch)
            return


def build(n: int, member_cls) -> Hub:
    """A hub with one subscribed room of `n` members (no broker round trip needed)."""
    hub = Hub(MemoryBroker(), loop=_NoLoop())
    room = hub.rooms["bench"] = Room("bench", None)
    room.subscribed = True
    for _ in range(n):
        member = member_cls()
        hub._register(member, room, None)
        hub._attach(member, room)
    return hub


def one_pass(hub: Hub, window: int, data: bytes, seq: int) -> None:
    for i in range(window):
        hub.handle_publication("bench", seq + i, data)
    hub._flush_scheduled = False
    hub._flush()


def measure(n: int, window: int, seconds: float, member_cls) -> dict:
    hub = build(n, member_cls)
    data = b'{"k":1,"p":"' + b"x" * 48 + b'"}'
    # Encoding alone (no members): the per-pass fixed cost.
    empty = build(0, member_cls)
    passes, seq = 0, 1
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 4:
        one_pass(empty, window, data, seq)
        seq += window
        passes += 1
    encode_us = (time.perf_counter() - t0) / passes * 1e6
    passes = 0
    t0 = time.perf_counter()
    while True:
        one_pass(hub, window, data, seq)
        seq += window
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and passes >= 3:
            break
    per_pass = elapsed / passes
    fanout_ns = max(0.0, per_pass * 1e9 - encode_us * 1e3)
    assert hub.deliveries == passes * window * n
    return {
        "members": n, "window": window, "passes": passes, "us/pass": per_pass * 1e6, "encode us": encode_us,
        "ns/member": fanout_ns / n, "ns/delivery": fanout_ns / (n * window),
        "deliveries/s (hub only)": n * window / per_pass,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", default="1,10,100,1000,10000")
    p.add_argument("--window", default="1,32")
    p.add_argument("--seconds", type=float, default=0.5, help="per measurement (default 0.5)")
    p.add_argument("--member", choices=["counting", "session"], default="session",
                   help="fake member: session-like fast path (default) or the bare minimum")
    args = p.parse_args(argv)
    import gateway_ext
    cls = SessionLikeMember if args.member == "session" else CountingMember
    print(f"hub fan-out pass, {args.member} members, gateway_ext={gateway_ext.IMPLEMENTATION}, python {sys.version.split()[0]}")
    cols = ["members", "window", "us/pass", "encode us", "ns/member", "ns/delivery", "deliveries/s (hub only)"]
    print("  ".join(f"{c:>12}" for c in cols))
    for window in (int(w) for w in args.window.split(",")):
        for n in (int(m) for m in args.members.split(",")):
            row = measure(n, window, args.seconds, cls)
            print("  ".join(f"{row[c]:>12,.1f}" if isinstance(row[c], float) else f"{row[c]:>12,}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
