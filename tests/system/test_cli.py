"""CLI: check-config prints the effective configuration or every error; serve's flags map to Config."""
import os
import subprocess
import sys
import tomllib

from gateway import cli
from gateway.config import Config, _FIELD_TYPES
from tests.helpers import ROOT


def run_cli(*args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_GATEWAY_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_check_config_prints_effective_toml(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('port = 9100\nworkers = 1\n\n[rooms]\nmax_rooms = 5\n')
    result = run_cli("check-config", str(path), env={"WS_GATEWAY_DRAIN_WINDOW": "0.5"})
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["port"] == 9100 and effective["drain_window"] == 0.5
    assert effective["rooms"] == {"max_rooms": 5}
    assert set(_FIELD_TYPES) <= set(effective)          # every option is shown
    assert f"# {path}:1" in result.stdout and "# $WS_GATEWAY_DRAIN_WINDOW" in result.stdout


def test_check_config_lists_every_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('port = -1\nping_timeout = 0\nlog_level = "loud"\nwat = 1\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert f"error: {path}:1: port: -1 is not a TCP port (0-65535)" in lines
    assert f"error: {path}:2: ping_timeout: must be positive" in lines
    assert any(line.startswith(f"error: {path}:3: log_level") for line in lines)
    assert any(line.startswith(f"error: {path}:4: unknown option 'wat'") for line in lines)
    assert lines[-1] == f"{path}: 4 error(s)"
    assert "Traceback" not in result.stderr


def test_check_config_missing_file_and_bad_toml(tmp_path):
    result = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[unclosed\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2 and f"{bad}:1: invalid TOML" in result.stderr


def test_serve_with_bad_config_exits_2_with_every_error():
    result = run_cli("serve", "--port", "0", "--drain-window", "-1", "--metrics-port", "70000")
    assert result.returncode == 2
    assert "--drain-window: drain_window: must be >= 0" in result.stderr
    assert "--metrics-port: metrics_port" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_config_field_has_a_flag():
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {action.dest for action in serve._actions}
    missing = set(_FIELD_TYPES) - dests
    assert not missing, f"Config fields without a --flag: {sorted(missing)}"


def test_flags_override_config(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("port = 9100\nmax_connections = 7\n")
    args = cli.build_parser().parse_args(["serve", "--config", str(path), "--port", "9200",
                                         "--drain-timeout", "3", "--metrics-port", "9300"])
    config = cli.config_from_args(args)
    assert isinstance(config, Config)
    assert (config.port, config.max_connections, config.drain_timeout, config.metrics_port) == (9200, 7, 3.0, 9300)


def test_version():
    result = run_cli("version")
    assert result.returncode == 0 and "hot path" in result.stdout
