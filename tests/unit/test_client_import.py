"""The Python SDK imports without the server: no gateway_ext (compiled or twin), no uvloop,
no redis, no other gateway module -- checked in a fresh interpreter where those are made
unimportable. Also without orjson and msgpack (the SDK falls back to json; msgpack only
when asked for)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import gateway.client
    from gateway.client import Client, Position
    from gateway.client.codec import JsonCodec
    client = Client("ws://127.0.0.1:1/ws", token="t")          # builds the websockets connect
    assert JsonCodec.decode(JsonCodec.encode({"op": "ack", "id": 1})) == {"op": "ack", "id": 1}
    assert Position.parse({"epoch": "e", "seq": 3}) == ("e", 3)
    import websockets.asyncio.client                              # the transport's dependency
    server = sorted(m for m in sys.modules if (m == "gateway" or m.startswith("gateway."))
                    and m != "gateway" and not m.startswith("gateway.client"))
    blocked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("server modules:", server)
    print("blocked modules:", blocked)
    assert not server and not blocked
""")


def _run(blocked: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "WS_GATEWAY_REQUIRE_EXT": "0"}
    return subprocess.run([sys.executable, "-c", SCRIPT, blocked], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_client_imports_without_server_parts():
    proc = _run("gateway_ext,uvloop,redis,hiredis,prometheus_client,jwt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "server modules: []" in proc.stdout


def test_client_imports_without_orjson_and_msgpack():
    proc = _run("gateway_ext,uvloop,redis,orjson,msgpack")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_check_would_catch_a_server_import():
    """The subprocess check is not vacuous: importing a server module is reported."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.replace("import gateway.client\n", "import gateway.client\nimport gateway.config\n"),
                           "gateway_ext,uvloop,redis"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
