"""Backend hook settings: check-config names each mistake, the secret is never printed, and a
hook configured without aiohttp stops start-up with one line saying what to install."""
import os
import subprocess
import sys

from tests.helpers import ROOT, free_port


def run_cli(*args, env=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_GATEWAY_")} | (env or {})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", ROOT)])
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_check_config_names_every_hook_mistake_and_redacts_the_secret(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('connect_proxy_url = "ftp://x"\nwebhook_url = "http://127.0.0.1:9/h"\nwebhook_secret = "short"\n'
                   'webhook_events = ["user_online", "user_left"]\nproxy_timeout = 0\nproxy_headers = ["bad header"]\n'
                   'webhook_retry_min = 5.0\nwebhook_retry_max = 1.0\n')
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    errors = result.stderr
    for needle in ("connect_proxy_url: must be an http:// or https:// URL",
                   "webhook_secret: webhook_url needs a webhook_secret of at least 16 characters",
                   "webhook_events: unknown event 'user_left'", "proxy_timeout: must be positive",
                   "proxy_headers: 'bad header' is not a header name", "webhook_retry_max: must be >= webhook_retry_min"):
        assert needle in errors, errors
    good = tmp_path / "good.toml"
    good.write_text('webhook_url = "http://127.0.0.1:9/h"\nwebhook_secret = "a-long-enough-secret-value"\n')
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "a-long-enough-secret-value" not in result.stdout and 'webhook_secret = "<redacted>"' in result.stdout


def test_a_hook_without_aiohttp_is_a_one_line_start_up_error(tmp_path):
    # A directory shadowing aiohttp with a module whose import fails, as on a host without it.
    (tmp_path / "aiohttp.py").write_text('raise ImportError("No module named aiohttp")\n')
    result = run_cli("serve", "--port", str(free_port()), "--connect-proxy-url", "http://127.0.0.1:9/c",
                     pythonpath=str(tmp_path))
    assert result.returncode == 2
    assert "needs the aiohttp package: pip install 'ws-gateway[hooks]'" in result.stderr
    assert "Traceback" not in result.stderr
