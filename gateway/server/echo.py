"""The `/echo` endpoint (only with `--echo`): every message comes back as it came.

Text stays text, binary stays binary. It exists for the Autobahn TestSuite and for
benchmarks, so it is the shortest possible path through the stack: the echoes of one
read join the pongs of that read in one corked write.
"""


class EchoEndpoint:
    subprotocols: tuple = ()
    # Conformance suites and benchmarks send far more than a browser client may: the
    # per-connection message rate limit (defences.py) does not apply here.
    rate_limit_exempt = True

    def select_subprotocol(self, request):
        return None

    def on_open(self, conn, subprotocol) -> None:
        pass

    def on_messages(self, conn, messages) -> None:
        send = conn.ws.send
        for opcode, payload in messages:
            send(opcode, payload)

    def on_writable(self, conn) -> None:
        pass

    def on_close(self, conn) -> None:
        pass
