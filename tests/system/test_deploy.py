"""deploy/: the systemd units verify, the sample config covers every option and checks clean,
the sysctl keys exist, the README explains every setting, and every metric the Grafana
dashboard queries is really exported by a gateway."""
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config
from tests.helpers import ROOT, serve, ws_url
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.requires import requires

DEPLOY = os.path.join(ROOT, "deploy")
UNITS = ["ws-gateway.service", "ws-gateway@.service", "ws-gateway.target"]
README = open(os.path.join(DEPLOY, "README.md")).read()


def _unit(name: str) -> str:
    return open(os.path.join(DEPLOY, "systemd", name)).read()


@requires("systemd-analyze")
def test_systemd_analyze_verify_passes(tmp_path):
    # ExecStart must name an existing executable: point it at this Python running the gateway.
    for name in UNITS:
        text = _unit(name).replace("/opt/ws-gateway/venv/bin/ws-gateway", f"{sys.executable} -m gateway")
        target = tmp_path / (name.replace("@.", "@8081.") if "@." in name else name)
        target.write_text(text)
    for path in sorted(tmp_path.iterdir()):
        result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path)
        # verify exits 0 on unknown keys / bad values and only warns: any line about our file fails.
        ours = [line for line in result.stderr.splitlines() if path.name in line or "ws-gateway" in line]
        assert result.returncode == 0 and not ours, result.stderr


def test_units_have_the_operational_settings():
    for name in ("ws-gateway.service", "ws-gateway@.service"):
        unit = _unit(name)
        settings = dict(re.findall(r"^(\w+)=(.*)$", unit, flags=re.M))
        assert settings["Type"] == "notify" and "WatchdogSec" in settings
        assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert int(settings["LimitNOFILE"]) >= 100_000
        assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
        # systemd must not SIGKILL before the gateway's own drain deadline.
        assert float(settings["TimeoutStopSec"]) > Config().drain_timeout
    assert "--port %i" in _unit("ws-gateway@.service")


def test_readme_explains_every_setting():
    directives = set()
    for name in UNITS:
        directives |= set(re.findall(r"^(\w+)=", _unit(name), flags=re.M))
    missing = sorted(d for d in directives if f"`{d}" not in README)
    assert not missing, f"deploy/README.md does not explain: {missing}"
    keys = re.findall(r"^([a-z0-9_.]+)\s*=", open(os.path.join(DEPLOY, "sysctl", "99-ws-gateway.conf")).read(), re.M)
    missing = sorted(k for k in keys if f"`{k}" not in README)
    assert not missing, f"deploy/README.md does not explain: {missing}"
    nginx = open(os.path.join(DEPLOY, "nginx", "ws-gateway.conf")).read()
    nginx += open(os.path.join(DEPLOY, "nginx", "nginx-main.conf")).read()
    directives = set(re.findall(r"^\s*((?:proxy|ssl|worker|least|multi)_?\w*)\b", nginx, re.M))
    missing = sorted(d for d in directives if f"`{d}" not in README)
    assert not missing, f"deploy/README.md does not explain: {missing}"


def test_sysctl_keys_exist_and_values_parse():
    text = open(os.path.join(DEPLOY, "sysctl", "99-ws-gateway.conf")).read()
    pairs = re.findall(r"^([a-z0-9_.]+)\s*=\s*(.+)$", text, re.M)
    assert len(pairs) >= 10
    for key, value in pairs:
        assert all(part.isdigit() for part in value.split()), (key, value)
        path = "/proc/sys/" + key.replace(".", "/")
        if key.startswith("fs.") or os.path.exists("/proc/sys/net/ipv4"):
            assert os.path.exists(path), f"{key} is not a kernel setting here ({path})"


def test_sample_config_covers_every_option_and_checks_clean():
    path = os.path.join(DEPLOY, "gateway.toml")
    text = open(path).read()
    fields = [f.name for f in dataclasses.fields(Config) if f.name != "room_policies"]
    missing = [name for name in fields if not re.search(rf"^#? ?{name} =", text, re.M)]
    missing += [] if re.search(r"^\[\[rooms\.policy\]\]$", text, re.M) else ["[[rooms.policy]] (room_policies)"]
    assert not missing, f"deploy/gateway.toml does not document: {missing}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_GATEWAY_")}
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", path], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr


def _dashboard_metrics() -> set[str]:
    dashboard = json.load(open(os.path.join(DEPLOY, "grafana", "ws-gateway.json")))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    return set(re.findall(r"\b((?:ws_gateway|process)_[a-z_]+)\b", " ".join(exprs)))


def test_dashboard_queries_only_metrics_the_gateway_exports(run, redis_server):
    wanted = _dashboard_metrics()
    assert len(wanted) > 30

    async def main():
        async with serve(broker=redis_server.url) as gw:
            async with websockets.connect(ws_url(gw, "/ws")) as ws:
                await ws.send(json.dumps({"op": "join", "room": "r", "id": 1}))
                await ws.recv()
                await ws.send(json.dumps({"op": "nonsense"}))   # a request error, counted by code
                await ws.recv()
                text = gw.metrics.render().decode()
        names = set()
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            if family.type == "counter":   # a labelled counter with no samples yet still exists
                names.add(family.name + "_total")
            names.update(s.name for s in family.samples)
        missing = sorted(m for m in wanted if m not in names)
        assert not missing, f"the dashboard queries metrics that are not exported: {missing}"
    run(main())


def _install_steps() -> list[str]:
    block = re.search(r"## Install, step by step.*?```sh\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_install_steps_match_the_units_and_the_build():
    steps = _install_steps()
    apt = next(line for line in steps if line.startswith("apt-get install"))
    # pip compiles the Cython hot path: a compiler and the Python headers (issue 20, item 9).
    assert {"build-essential", "python3-dev", "python3-venv", "nginx", "redis-server"} <= set(apt.split())
    binary = re.search(r"^ExecStart=(\S+) ", _unit("ws-gateway@.service"), re.M).group(1)
    calls = [line for line in steps if re.search(r"\bws-gateway (check-config|serve|--version)", line)]
    assert calls and all(f"{binary} " in line for line in calls), calls   # the venv's binary, as the units
    merge = [line for line in README.split("```sh", 1)[1].split("```")[0].splitlines() if "nginx-main.conf" in line]
    assert merge, "no step merges nginx/nginx-main.conf"
    main_directives = re.findall(r"^\s*(\w+) ", open(os.path.join(DEPLOY, "nginx", "nginx-main.conf")).read(), re.M)
    block = README.split("```sh", 1)[1].split("```")[0]
    assert all(d in block for d in main_directives if d != "events"), main_directives


def test_the_host_name_step_replaces_every_example_name(tmp_path):
    sed = next(line for line in _install_steps() if line.startswith("sed -i"))
    site = tmp_path / "ws-gateway.conf"
    site.write_text(open(os.path.join(DEPLOY, "nginx", "ws-gateway.conf")).read())
    assert "ws.example.com" in site.read_text()
    subprocess.run(sed.replace("deploy/nginx/ws-gateway.conf", str(site)), shell=True, check=True, timeout=30)
    text = site.read_text()
    host = re.search(r"-d (\S+)", next(line for line in _install_steps() if line.startswith("certbot"))).group(1)
    assert "example.com" not in text and f"server_name {host};" in text
    assert f"/etc/letsencrypt/live/{host}/fullchain.pem" in text     # where certbot puts it


def test_the_check_config_step_passes_with_the_units_flags():
    step = next(line for line in _install_steps() if "check-config" in line)
    flags = re.search(r"check-config \S+ (.*?)\)?$", step).group(1).split()
    unit_flags = re.search(r"^ExecStart=\S+ serve --config \S+ (.*)$", _unit("ws-gateway@.service"), re.M).group(1)
    assert flags == unit_flags.replace("%i", "8081").split()     # the same overrides as the instance
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_GATEWAY_")}
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", os.path.join(DEPLOY, "gateway.toml"),
                             *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r'^port = 8081 +# --port$', result.stdout, re.M)


def _location(text: str, name: str) -> list[str]:
    body = re.search(rf"location = {re.escape(name)} \{{(.*?)\n\s*\}}", text, re.S).group(1)
    return sorted(line.split("#")[0].strip() for line in body.splitlines() if line.split("#")[0].strip()
                  and not line.strip().startswith("access_log"))


def test_the_security_guide_nginx_block_agrees_with_the_site_file():
    guide = open(os.path.join(ROOT, "docs", "security.md")).read()
    site = open(os.path.join(DEPLOY, "nginx", "ws-gateway.conf")).read()
    documented = _location(guide, "/ws")
    shipped = _location(site, "/ws")
    # The site sets proxy_http_version for the whole server block; the guide's location repeats it.
    shipped_server = re.findall(r"^    (proxy_http_version [^;]+;)", site, re.M)
    assert documented == sorted(shipped + shipped_server), (documented, shipped)
    assert "location / {\n        proxy_pass" not in guide     # /ws only, as deploy/ (issue 20, item 9)
