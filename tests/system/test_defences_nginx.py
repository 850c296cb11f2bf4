"""The nginx configuration of docs/security.md, run for real in front of the gateway.

The `nginx` block is read from the document itself (ports, certificate and log paths
substituted), so the documented setup is the tested one: TLS at nginx, the client's address
from X-Forwarded-For believed only because nginx is a trusted proxy, a forged entry ignored,
tokens kept out of the access log, /api/publish and /metrics private.
"""
import asyncio
import json
import datetime
import os
import re
import socket
import ssl
import subprocess
import time

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import auth_tokens as t
from tests.helpers import ROOT, free_port, join_ack, serve
from tests.requires import binary, requires

NGINX = binary("nginx")
pytestmark = [pytest.mark.timeout(60),
              requires("nginx")]


def documented_nginx_block() -> str:
    with open(os.path.join(ROOT, "docs", "security.md")) as fh:
        text = fh.read()
    return re.search(r"```nginx\n(.*?)```", text, re.S).group(1)


def self_signed(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class Nginx:
    def __init__(self, directory, gateway_port):
        self.dir = directory
        self.port = free_port()
        cert, key = self_signed(directory)
        self.access_log = str(directory / "access.log")
        block = (documented_nginx_block()
                 .replace("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;")
                 .replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{gateway_port};")
                 .replace("/etc/ssl/chat.example.com.pem", cert)
                 .replace("/etc/ssl/chat.example.com.key", key)
                 .replace("/var/log/nginx/ws-gateway.log", self.access_log))
        temp = " ".join(f"{kind}_temp_path {directory}/{kind};" for kind in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = (f"worker_processes 1;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log info;\n"
                f"events {{ worker_connections 256; }}\nhttp {{\n{temp}\n{block}\n}}\n")
        (directory / "nginx.conf").write_text(conf)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stdout.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def client_tls():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE      # self-signed test certificate
    return ctx


def test_documented_nginx_setup(run, tmp_path):
    async def main():
        async with serve(jwt_secret=t.SECRET, trusted_proxies="127.0.0.1", max_connections_per_ip=1,
                         allowed_origins="https://chat.example.com", api_keys="k" * 20) as gw:
            nginx = Nginx(tmp_path, gw.port).start()
            try:
                await exercise(gw, nginx)
            finally:
                nginx.stop()
            log = open(nginx.access_log).read()
            assert "/ws" in log and "token" not in log and "eyJ" not in log   # JWTs start with eyJ
    run(main())


async def exercise(gw, nginx):
    base = f"wss://127.0.0.1:{nginx.port}/ws"
    token = t.hs256(sub="erin")

    def connect(source, extra_headers=None, tok=token):
        return websockets.connect(f"{base}?token={tok}", ssl=client_tls(), origin="https://chat.example.com",
                                  local_addr=(source, 0), additional_headers=extra_headers, open_timeout=10)

    async with connect("127.0.0.2") as a:
        await a.send('{"op":"join","room":"lobby","id":1}')
        assert join_ack(json.loads(await asyncio.wait_for(a.recv(), 10))) == {"op": "ack", "id": 1}
        assert [c.client_ip for c in gw.connections] == ["127.0.0.2"]      # not nginx's 127.0.0.1
        assert [c.user for c in gw.connections] == ["erin"]
        # same client again, pretending to be someone else: the proxy-appended address counts
        with pytest.raises(websockets.InvalidStatus) as info:
            async with connect("127.0.0.2", {"X-Forwarded-For": "203.0.113.9"}):
                pass
        assert info.value.response.status_code == 429
        async with connect("127.0.0.3") as b:                                # a different client: fine
            await b.send('{"op":"join","room":"lobby","id":2}')
            assert join_ack(json.loads(await asyncio.wait_for(b.recv(), 10))) == {"op": "ack", "id": 2}
        # 401 and 403 pass through nginx unchanged
        with pytest.raises(websockets.InvalidStatus) as info:
            async with connect("127.0.0.4", tok=t.hs256(secret=t.OTHER_SECRET)):
                pass
        assert info.value.response.status_code == 401
        assert b"signature verification failed" in info.value.response.body
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"{base}?token={token}", ssl=client_tls(), origin="https://evil.example",
                                          local_addr=("127.0.0.5", 0), open_timeout=10):
                pass
        assert info.value.response.status_code == 403
        # backends only: nginx refuses /api/publish and /metrics from outside 10.0.0.0/8
        for path in ("/api/publish", "/metrics"):
            status = await asyncio.get_running_loop().run_in_executor(None, https_status, nginx.port, path)
            assert status == 403
        await a.send("{}")   # the first client is still fine
        assert '"bad_request"' in await asyncio.wait_for(a.recv(), 10)


def https_status(port, path):
    import http.client
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_tls(), timeout=10)
    try:
        conn.request("POST", path, body=b'{"room":"lobby","data":1}',
                     headers={"Authorization": "Bearer " + "k" * 20, "Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()
