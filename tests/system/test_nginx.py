"""A real nginx (the shipped deploy/nginx config, paths substituted) in front of two gateway
processes: wss:// through TLS termination, join/publish/receive on /ws, least_conn across
instances, and a drain on one instance that new clients route around."""
import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
import uvloop
import websockets

from tests.certs import client_context, make_cert
from tests.helpers import ROOT, GatewayProcess, free_port, join_ack
from tests.requires import binary, requires

NGINX = binary("nginx")
pytestmark = requires("nginx")
SITE = os.path.join(ROOT, "deploy", "nginx", "ws-gateway.conf")
MAIN = os.path.join(ROOT, "deploy", "nginx", "nginx-main.conf")


def render_nginx(tmp, cert, key, https_port, http_port, upstream_ports) -> str:
    """nginx.conf for a test prefix: the shipped main snippet and site, with only paths/ports changed."""
    site = open(SITE).read()
    site = site.replace("/etc/letsencrypt/live/ws.example.com/fullchain.pem", cert)
    site = site.replace("/etc/letsencrypt/live/ws.example.com/privkey.pem", key)
    site = re.sub(r"^\s*listen \[::\]:\d+.*\n", "", site, flags=re.M)   # tests stay on 127.0.0.1
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    site = site.replace("root /var/www/html;", f"root {tmp};")
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+ .*;$", site, flags=re.M)
    assert len(servers) >= 2, "the shipped upstream should list several instances"
    template = servers[0]
    for line in servers[1:]:
        site = site.replace(line + "\n", "")
    site = site.replace(template, "\n".join(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{p}", template)
                                            for p in upstream_ports))
    with open(os.path.join(tmp, "site.conf"), "w") as fh:
        fh.write(site)
    main = open(MAIN).read()
    # This machine's hard limit is lower than production's; the directive itself stays.
    main = re.sub(r"worker_rlimit_nofile \d+;", "worker_rlimit_nofile 4096;", main)
    main = re.sub(r"worker_connections \d+;", "worker_connections 2048;", main)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(tmp, name), mode=0o777, exist_ok=True)
        os.chmod(os.path.join(tmp, name), 0o777)   # workers run as an unprivileged user
    conf = f"""
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
{main}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
"""
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as fh:
        fh.write(conf)
    return path


def nginx_test(conf: str, tmp: str) -> subprocess.CompletedProcess:
    return subprocess.run([NGINX, "-t", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "error.log")],
                          capture_output=True, text=True, timeout=30)


def test_nginx_t_accepts_the_shipped_config(tmp_path):
    tmp = str(tmp_path)
    cert, key = make_cert(tmp)
    conf = render_nginx(tmp, cert, key, free_port(), free_port(), [free_port(), free_port()])
    result = nginx_test(conf, tmp)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr
    # ... and the test can fail: a broken directive is refused.
    with open(os.path.join(tmp, "site.conf"), "a") as fh:
        fh.write("proxy_read_timeout forever;\n")
    assert nginx_test(conf, tmp).returncode != 0


@pytest.fixture
def stack(tmp_path):
    """Two gateway instances behind nginx; yields (https_port, http_port, cert, [instances])."""
    tmp = str(tmp_path)
    cert, key = make_cert(tmp)
    args = ("--trusted-proxies", "127.0.0.1", "--drain-window", "1", "--drain-timeout", "5", "--log-level", "info")
    instances = [GatewayProcess(*args).start(), GatewayProcess(*args).start()]
    https_port, http_port = free_port(), free_port()
    conf = render_nginx(tmp, cert, key, https_port, http_port, [gw.port for gw in instances])
    proc = subprocess.Popen([NGINX, "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_https(https_port, cert, proc, tmp)
        yield https_port, http_port, cert, instances
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for gw in instances:
            gw.__exit__(None, None, None)


def _wait_https(port, cert, proc, tmp, timeout=15.0):
    ctx = client_context(cert)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("nginx exited:\n" + open(os.path.join(tmp, "error.log")).read())
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)   # nginx is starting; there is no event to await across processes
    raise RuntimeError("nginx did not answer:\n" + open(os.path.join(tmp, "error.log")).read())


def _open_connections(gw) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ws_gateway_connections_open "):
                return float(line.split()[1])
    raise AssertionError("no ws_gateway_connections_open")


def test_wss_through_nginx_join_publish_receive(stack):
    https_port, http_port, cert, instances = stack

    async def main():
        url = f"wss://127.0.0.1:{https_port}/ws"
        ctx = client_context(cert)
        async with websockets.connect(url, ssl=ctx) as a, websockets.connect(url, ssl=ctx) as b:
            # least_conn: two concurrent clients land on different instances.
            counts = await asyncio.to_thread(lambda: [_open_connections(gw) for gw in instances])
            assert counts == [1.0, 1.0]
            await a.send(json.dumps({"op": "join", "room": "lobby", "id": 1}))
            assert join_ack(json.loads(await a.recv())) == {"op": "ack", "id": 1}
            await a.send(json.dumps({"op": "publish", "room": "lobby", "data": {"hello": "nginx"}, "id": 2}))
            replies = [json.loads(await a.recv()) for _ in range(2)]
            message = next(r for r in replies if r["op"] == "message")
            assert message["room"] == "lobby" and message["data"] == {"hello": "nginx"}
            assert any(r["op"] == "ack" and r["id"] == 2 for r in replies)
            await b.send(json.dumps({"op": "nonsense"}))
            assert json.loads(await b.recv())["code"] == "unknown_op"
    uvloop.run(main())


def test_nginx_routes_and_redirects(stack):
    https_port, http_port, cert, _ = stack
    ctx = client_context(cert)
    # /metrics is denied through nginx, however its path is spelled.
    for path in ("/metrics", "/metrics?x=1", "/%6detrics", "//metrics"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"https://127.0.0.1:{https_port}{path}", context=ctx, timeout=5)
        assert info.value.code == 403, path
    # Plain HTTP is redirected to HTTPS.
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(f"http://127.0.0.1:{http_port}/ws?token=x", timeout=5)
    assert info.value.code == 301 and info.value.headers["Location"].startswith("https://")
    with urllib.request.urlopen(f"https://127.0.0.1:{https_port}/readyz", context=ctx, timeout=5) as r:
        assert r.status == 200


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_draining_instance_is_routed_around(stack):
    https_port, _, cert, instances = stack

    async def main():
        url = f"wss://127.0.0.1:{https_port}/ws"
        ctx = client_context(cert)
        clients = [await websockets.connect(url, ssl=ctx), await websockets.connect(url, ssl=ctx)]
        instances[0].signal(signal.SIGTERM)
        # The client on the draining instance gets 1001 through nginx ...
        done, _ = await asyncio.wait([asyncio.create_task(ws.wait_closed()) for ws in clients],
                                     return_when=asyncio.FIRST_COMPLETED, timeout=10)
        assert len(done) == 1
        closed = [ws for ws in clients if ws.close_code is not None]
        assert [ws.close_code for ws in closed] == [1001]
        # ... and new clients reach the other instance (503 / refused -> proxy_next_upstream).
        for _ in range(5):
            async with websockets.connect(url, ssl=ctx) as ws:
                await ws.send(json.dumps({"op": "join", "room": "r", "id": 7}))
                assert join_ack(json.loads(await ws.recv())) == {"op": "ack", "id": 7}
        survivor = next(ws for ws in clients if ws.close_code is None)
        await survivor.send(json.dumps({"op": "join", "room": "r", "id": 8}))
        assert join_ack(json.loads(await survivor.recv())) == {"op": "ack", "id": 8}
        await survivor.close()
    uvloop.run(main())
    assert instances[0].proc.wait(timeout=10) == 0
