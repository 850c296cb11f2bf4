"""CLI: check-config and serve share one validation and the same flags; errors are short, name the
flag the user typed and never show a traceback; --version; grouped --help with every variable."""
import os
import socket
import subprocess
import sys
import tomllib

import pytest

from gateway import cli
from gateway.config import Config, _FIELD_TYPES
from tests.helpers import ROOT, free_port


def run_cli(*args, env=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_GATEWAY_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_check_config_prints_effective_toml(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('port = 9100\nworkers = 1\n\n[[rooms.policy]]\npattern = "cursor.*"\npolicy = "latest"\n')
    result = run_cli("check-config", str(path), env={"WS_GATEWAY_DRAIN_WINDOW": "0.5"})
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["port"] == 9100 and effective["drain_window"] == 0.5
    assert effective["rooms"] == {"policy": [{"pattern": "cursor.*", "policy": "latest"}]}
    assert set(_FIELD_TYPES) <= set(effective)          # every option is shown
    assert f"# {path}:1" in result.stdout and "# $WS_GATEWAY_DRAIN_WINDOW" in result.stdout
    assert f"# {path}:4" in result.stdout               # the rule's line


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


def test_check_config_takes_the_flags_of_serve(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("port = 9100\n")
    # What a systemd unit adds to the file (deploy/systemd/ws-gateway@.service) can be checked too.
    result = run_cli("check-config", "--config", str(path), "--host", "127.0.0.1", "--port", "8081")
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["port"] == 8081 and "port = 8081" in result.stdout and "# --port" in result.stdout
    result = run_cli("check-config", str(path), "--port", "80800")
    assert result.returncode == 2 and "error: --port: port: 80800 is not a TCP port" in result.stderr
    assert run_cli("check-config", "--port", "8081").returncode == 0          # no file: defaults + flags
    parser = cli.build_parser()
    serve, check = (parser._subparsers._group_actions[0].choices[name] for name in ("serve", "check-config"))
    assert {a.dest for a in serve._actions} <= {a.dest for a in check._actions}


# Each mistake, given to serve and to check-config: the same error lines (one validation).
BAD_CONFIGS = [
    ('[[rooms.policy]]\npattern = "a*"\npolicy = "latst"\n', "rooms.policy[0].policy: 'latst' is not one of"),
    ('[[rooms.policy]]\npattern = "a*"\nmax_queue_bytes = "big"\n', "rooms.policy[0].max_queue_bytes: expected an integer"),
    ('[room.policy]\npattern = "a*"\n', "unknown table [room] (did you mean 'rooms'?)"),
    ('port = "8080"\n', "port: expected an integer, got the string '8080'"),
    ('broker = "redis+clustr://a:1"\n', "broker: unsupported scheme 'redis+clustr'"),
    ('jwt_secret = "0123456789abcdef0123456789abcdef"\njwt_secret_file = "/etc/hostname"\n',
     "jwt_secret_file: jwt_secret and jwt_secret_file are mutually exclusive"),
    ('jwt_public_key_file = "/nonexistent.pem"\n', "jwt_public_key_file: cannot read"),
]


@pytest.mark.parametrize("text, error", BAD_CONFIGS, ids=[e.split(":")[0] for _t, e in BAD_CONFIGS])
def test_serve_and_check_config_report_the_same_errors(tmp_path, text, error):
    path = tmp_path / "gw.toml"
    path.write_text(text)
    check = run_cli("check-config", str(path))
    serve = run_cli("serve", "--config", str(path), "--port", str(free_port()))
    assert check.returncode == serve.returncode == 2
    assert "Traceback" not in check.stderr + serve.stderr
    check_errors = [line.removeprefix("error: ") for line in check.stderr.splitlines() if line.startswith("error: ")]
    serve_errors = [line.removeprefix("ws-gateway: configuration error: ") for line in serve.stderr.splitlines()]
    assert check_errors == serve_errors and any(error in line for line in serve_errors), (check.stderr, serve.stderr)


def test_errors_about_files_a_setting_names_say_where_it_was_set(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('host = "127.0.0.1"\njwt_public_key_file = "/nonexistent.pem"\n')
    result = run_cli("check-config", str(path), "--allowed-origins", "app.example.com")
    lines = result.stderr.splitlines()
    assert result.returncode == 2
    assert lines[0].startswith(f"error: {path}:2: jwt_public_key_file: cannot read '/nonexistent.pem'"), lines
    assert lines[1].startswith("error: --allowed-origins: allowed_origins: 'app.example.com' is not an origin"), lines


def test_bad_tls_files_are_one_line_for_serve_and_check_config(tmp_path):
    from tests.certs import make_cert
    cert, _ = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")
    for command in ("check-config", "serve"):
        result = run_cli(command, "--certfile", cert, "--keyfile", other_key, "--port", str(free_port()))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "certfile: cannot load the certificate/key pair" in result.stderr, result.stderr
    result = run_cli("serve", "--certfile", cert, "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["ws-gateway: configuration error: --certfile: certfile: native TLS needs "
                                          "keyfile too (the certificate's private key)"]


def test_errors_name_the_flag_that_was_typed():
    result = run_cli("serve", "--api-key", "short", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("ws-gateway: configuration error: --api-key: api_keys: every key needs at least 16")


def test_a_bad_value_gets_a_short_message():
    result = run_cli("serve", "--port", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["ws-gateway: configuration error: --port: expected an integer, got 'abc'"]
    result = run_cli("serve", "--prot", "1")
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) <= 3, result.stderr
    assert "unrecognized arguments: --prot 1 (did you mean --port?)" in lines[0]
    assert lines[1].startswith("usage: ws-gateway serve [--config FILE]") and "--help" in lines[2]


def test_serve_with_bad_config_exits_2_with_every_error():
    result = run_cli("serve", "--port", "0", "--drain-window", "-1", "--metrics-port", "70000")
    assert result.returncode == 2
    assert "--drain-window: drain_window: must be >= 0" in result.stderr
    assert "--metrics-port: metrics_port" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_config_field_has_a_flag_with_help_and_its_variable():
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {action.dest for action in serve._actions}
    missing = set(_FIELD_TYPES) - dests
    assert not missing, f"Config fields without a --flag: {sorted(missing)}"
    for action in serve._actions:
        assert action.help, f"{action.option_strings} has no help text"
        if action.dest in _FIELD_TYPES:
            assert f"$WS_GATEWAY_{action.dest.upper()}" in action.help, action.option_strings
    assert len(serve._action_groups) >= 10      # listening, endpoints, ..., logging


def test_serve_help_is_grouped():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for title in ("listening:", "endpoints:", "broker (several processes and machines):", "logging:"):
        assert f"\n{title}\n" in result.stdout
    assert "[$WS_GATEWAY_PING_TIMEOUT; default 20.0]" in " ".join(result.stdout.split())
    assert result.stdout.startswith("usage: ws-gateway serve [--config FILE] [--host ADDR] [--port N] [options]\n")


def test_version_flag_and_command():
    flag, command = run_cli("--version"), run_cli("version")
    assert flag.returncode == command.returncode == 0
    assert flag.stdout == command.stdout and flag.stdout.startswith("ws-gateway ") and "hot path" in flag.stdout


def test_flags_override_config(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("port = 9100\nmax_connections = 7\n")
    args = cli.build_parser().parse_args(["serve", "--config", str(path), "--port", "9200",
                                         "--drain-timeout", "3", "--metrics-port", "9300"])
    config = cli.config_from_args(args)
    assert isinstance(config, Config)
    assert (config.port, config.max_connections, config.drain_timeout, config.metrics_port) == (9200, 7, 3.0, 9300)


def test_config_file_from_the_environment(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("port = 9100\n")
    result = run_cli("check-config", env={"WS_GATEWAY_CONFIG": str(path)})
    assert result.returncode == 0 and tomllib.loads(result.stdout)["port"] == 9100


# -- start-up failures: one line, exit status 2, a traceback only at debug level ----------------

def _one_line(result, needle):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines == [lines[0]] and lines[0].startswith("ws-gateway: error: ") and needle in lines[0], result.stderr
    return lines[0]


def test_port_in_use_is_one_line_naming_host_and_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line(run_cli("serve", "--port", str(port), "--log-level", "warning"),
                         f"port {port} on 127.0.0.1 is already in use")
        assert "choose another --port" in line
        # Workers: the parent checks once, before forking (not one traceback per worker).
        _one_line(run_cli("serve", "--port", str(port), "--workers", "2", "--broker", "redis://127.0.0.1:1/0"),
                  "already in use")
        debug = run_cli("serve", "--port", str(port), "--log-level", "debug")
        assert debug.returncode == 2 and "Traceback" in debug.stderr and "already in use" in debug.stderr


def test_metrics_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line(run_cli("serve", "--port", str(free_port()), "--metrics-port", str(port)),
                  f"metrics_port {port} on 127.0.0.1 is already in use (another ws-gateway or another program "
                  "listens there); stop it or choose another --metrics-port")


def test_an_address_this_machine_does_not_have_is_one_line():
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a host.
    _one_line(run_cli("serve", "--host", "192.0.2.1", "--port", str(free_port())),
              "192.0.2.1 is not an address of this machine")


def test_a_bad_broker_url_is_one_line_without_the_password():
    result = run_cli("serve", "--broker", "redis://:hunter2@localhost:6379/abc", "--port", "0")
    assert result.returncode == 2 and "hunter2" not in result.stderr
    assert result.stderr.splitlines() == ["ws-gateway: configuration error: --broker: broker: the Redis database "
                                          "'abc' is not a number"]
