"""Config: precedence (defaults < TOML < env < flags), every error with its location, round trip."""
import textwrap

import pytest

from gateway import config as cfg
from gateway.errors import ConfigError


def write(tmp_path, text, name="gw.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_are_valid():
    config = cfg.load(None, env={})
    assert config.port == 8080 and config.drain_window < config.drain_timeout


def test_precedence_file_env_flags(tmp_path):
    path = write(tmp_path, """
        port = 9000
        max_connections = 10
        log_level = "warning"
    """)
    env = {"WS_GATEWAY_PORT": "9001", "WS_GATEWAY_LOG_LEVEL": "error"}
    loaded = cfg.load_with_sources(path, env=env, overrides={"port": 9002, "host": None})
    c = loaded.config
    assert (c.port, c.log_level, c.max_connections) == (9002, "error", 10)
    assert loaded.sources["port"] == "--port"
    assert loaded.sources["log_level"] == "$WS_GATEWAY_LOG_LEVEL"
    assert loaded.sources["max_connections"] == f"{path}:3"
    assert "host" not in loaded.sources  # None flags do not override


def test_every_error_is_reported_with_its_location(tmp_path):
    path = write(tmp_path, """\
        port = 70000
        workers = "many"
        prot = 1
        drain_window = 30.0
        log_format = "xml"
    """)
    env = {"WS_GATEWAY_PING_TIMEOUT": "soon"}
    with pytest.raises(ConfigError) as info:
        cfg.load(path, env=env, overrides={"max_connections": 0})
    errors = info.value.errors
    assert f"{path}:1: port: 70000 is not a TCP port (0-65535)" in errors
    assert f"{path}:2: workers: expected an integer, got 'many'" in errors
    assert any(e.startswith(f"{path}:3: unknown option 'prot'") and "did you mean 'port'" in e for e in errors)
    assert any(e.startswith(f"{path}:4: drain_window: must be shorter than drain_timeout") for e in errors)
    assert any(e.startswith(f"{path}:5: log_format:") for e in errors)
    assert any(e.startswith("$WS_GATEWAY_PING_TIMEOUT: expected a number") for e in errors)
    assert "--max-connections: max_connections: must be at least 1" in errors
    assert len(errors) == 7


def test_invalid_toml_names_the_line(tmp_path):
    path = write(tmp_path, "host = '127.0.0.1'\nport = \n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path, env={})
    assert info.value.errors[0].startswith(f"{path}:2: invalid TOML")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(str(tmp_path / "nope.toml"), env={})


@pytest.mark.parametrize("key, value, message", [
    ("port", "true", "expected an integer, got a boolean"),
    ("close_timeout", "[1, 2]", "expected a single float value, got a list"),
    ("host", "5", "expected a string"),
    ("max_message_bytes", "1.5", "expected an integer"),
    ("echo", '"maybe"', "expected a boolean"),
])
def test_type_errors(tmp_path, key, value, message):
    path = write(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=message):
        cfg.load(path, env={})


def test_sections_are_kept_and_env_overrides_their_keys(tmp_path):
    path = write(tmp_path, """
        [rooms]
        max_queue_bytes = 1000
        [rooms.policies]
        "ticker.*" = "latest"
        [broker]
        url = "redis://127.0.0.1:6379/0"
    """)
    env = {"WS_GATEWAY_ROOMS__MAX_QUEUE_BYTES": "2000", "WS_GATEWAY_AUTH__JWT_SECRET": "s3cret"}
    loaded = cfg.load_with_sources(path, env=env)
    extra = loaded.config.extra
    assert extra["rooms"]["max_queue_bytes"] == 2000          # parsed as a TOML scalar
    assert extra["rooms"]["policies"] == {"ticker.*": "latest"}
    assert extra["broker"]["url"].startswith("redis://")
    assert extra["auth"]["jwt_secret"] == "s3cret"            # not a TOML value: kept as text
    assert loaded.config.broker == "memory://"                 # the [broker] table does not clobber the field


def test_registered_section_check_reports_key_line(tmp_path):
    def check(table):
        return [("size", "must be positive")] if table.get("size", 1) <= 0 else []
    cfg.register_section("widgets", check)
    try:
        path = write(tmp_path, "port = 1\n\n[widgets]\nname = 'a'\nsize = -1\n")
        with pytest.raises(ConfigError) as info:
            cfg.load(path, env={})
        assert info.value.errors == [f"{path}:5: widgets.size: must be positive"]
        loaded = cfg.load_with_sources(write(tmp_path, "[widgets]\nsize = 2\n", "ok.toml"), env={})
        assert not any("widgets" in w for w in loaded.warnings)
    finally:
        cfg._SECTION_CHECKS.pop("widgets")


def test_to_toml_round_trips(tmp_path):
    original = cfg.load(None, env={}, overrides={"port": 1234, "log_format": "text", "drain_window": 0.5})
    original = original.replace(extra={"rooms": {"a": 1, "b": ["x", "y"], "nested": {"c": True}}})
    path = write(tmp_path, cfg.to_toml(original))
    assert cfg.load(path, env={}) == original


def test_tls_needs_both_files_and_readable_pem(tmp_path):
    with pytest.raises(ConfigError, match="keyfile: native TLS needs both"):
        cfg.load(None, env={}, overrides={"certfile": "/etc/hostname"})
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the certificate"):
        cfg.load(None, env={}, overrides={"certfile": str(bad), "keyfile": str(bad)})
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(None, env={}, overrides={"certfile": str(tmp_path / "x"), "keyfile": str(bad)})


def test_metrics_port_must_differ():
    with pytest.raises(ConfigError, match="metrics_port: must differ"):
        cfg.load(None, env={}, overrides={"port": 9000, "metrics_port": 9000})


def test_locate_keys():
    where = cfg.locate_keys('a = 1\n[t]\n# c\nb = 2\n[t.u]\n"q.r" = 3\nd.e = 4\n[[arr]]\nf = 5\n')
    assert where[("a",)] == 1 and where[("t",)] == 2 and where[("t", "b")] == 4
    assert where[("t", "u", "q.r")] == 6
    assert where[("t", "u", "d", "e")] == 7 and where[("arr", 0, "f")] == 9 and where[("arr",)] == 8


def test_array_of_tables_errors_point_at_their_entry(tmp_path):
    def check(table):
        return [(f"rule[{i}].size", "must be positive") for i, rule in enumerate(table.get("rule", []))
                if rule.get("size", 1) <= 0]
    cfg.register_section("gadgets", check)
    try:
        path = write(tmp_path, "[[gadgets.rule]]\nsize = 1\n\n[[gadgets.rule]]\nname = 'x'\nsize = 0\n")
        with pytest.raises(ConfigError) as info:
            cfg.load(path, env={})
        assert info.value.errors == [f"{path}:6: gadgets.rule[1].size: must be positive"]
    finally:
        cfg._SECTION_CHECKS.pop("gadgets")


def test_check_config_output_redacts_broker_password(tmp_path):
    from gateway.config import load, redact_url, to_toml
    path = tmp_path / "g.toml"
    path.write_text('broker = "redis://:hunter2-secret@127.0.0.1:6390/0"\n')
    text = to_toml(load(str(path), env={}))
    assert "hunter2-secret" not in text
    assert "redis://:<redacted>@127.0.0.1:6390/0" in text
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("rediss://user:pw@h:1") == "rediss://user:<redacted>@h:1"
