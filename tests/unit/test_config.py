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
    assert f"{path}:2: workers: expected an integer, got the string 'many'" in errors
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


def test_room_policies_are_typed_rules_with_their_lines(tmp_path):
    path = write(tmp_path, """\
        slow_consumer_policy = "drop_oldest"

        [[rooms.policy]]
        pattern = "cursor.*"
        policy = "latest"
        max_queue_bytes = 65536

        [[rooms.policy]]
        pattern = "chat.*"
    """)
    loaded = cfg.load_with_sources(path, env={})
    assert loaded.config.room_policies == (cfg.RoomPolicy("cursor.*", "latest", 65536), cfg.RoomPolicy("chat.*"))
    assert loaded.sources["rooms.policy[1]"] == f"{path}:8"
    with pytest.raises(AttributeError):
        loaded.config.room_policies[0].policy = "disconnect"     # frozen: validated once, never changed


def test_room_policy_errors_name_the_rule_and_the_line(tmp_path):
    path = write(tmp_path, """\
        [[rooms.policy]]
        pattern = "a*"

        [[rooms.policy]]
        pattern = "b*"
        policy = "latst"
        max_queue_bytes = "big"
        colour = "red"
    """)
    with pytest.raises(ConfigError) as info:
        cfg.load(path, env={})
    assert info.value.errors == [
        f"{path}:6: rooms.policy[1].policy: 'latst' is not one of disconnect, drop_oldest, drop_newest, latest "
        "(did you mean 'latest'?)",
        f"{path}:7: rooms.policy[1].max_queue_bytes: expected an integer, got the string 'big'",
        f"{path}:8: rooms.policy[1].colour: unknown key; a rule has pattern, policy, max_queue_bytes, history_size, "
        "history_ttl, presence, join_leave",
    ]


@pytest.mark.parametrize("text, error", [
    ('[room.policy]\npattern = "a*"\n', "1: unknown table [room] (did you mean 'rooms'?)"),
    ('[rooms]\npolicies = []\n', "2: unknown key rooms.policies (did you mean 'policy'?)"),
    ('[rooms.policy]\npattern = "a*"\n', "1: rooms.policy must be an array of tables: write [[rooms.policy]]"),
    ('[broker]\nurl = "redis://h"\n', "1: [broker] is not a table: broker is a single setting"),
    ('[metrics]\nport = 1\n', "1: unknown table [metrics]"),
    ('pot = 1\n', "1: unknown option 'pot' (did you mean 'port'?)"),
])
def test_unknown_tables_and_keys_are_errors(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        cfg.load(path, env={})
    assert any(e.startswith(f"{path}:{error}") for e in info.value.errors), info.value.errors


@pytest.mark.parametrize("text, error", [
    ('port = "8080"', "port: expected an integer, got the string '8080' (write port = 8080, without quotes)"),
    ('echo = "true"', "echo: expected a boolean (true or false), got the string 'true' (write echo = true"),
    ('ping_interval = "5"', "ping_interval: expected a number, got the string '5'"),
    ("port = 8080.0", "port: expected an integer, got 8080.0"),
    ("host = 127", "host: expected a string, got 127"),
])
def test_wrong_toml_types_are_errors(tmp_path, text, error):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path, env={})
    assert info.value.errors[0].startswith(f"{path}:1: {error}"), info.value.errors


def test_environment_and_flags_are_text_and_parsed():
    config = cfg.load(None, env={"WS_GATEWAY_PORT": "9001", "WS_GATEWAY_ECHO": "yes"}, overrides={"ping_interval": "5"})
    assert (config.port, config.echo, config.ping_interval) == (9001, True, 5.0)


def test_unknown_environment_variables_are_warned_about():
    loaded = cfg.load_with_sources(None, env={"WS_GATEWAY_PROT": "1", "WS_GATEWAY_REQUIRE_EXT": "1"})
    assert loaded.warnings == ["$WS_GATEWAY_PROT: not a setting, ignored (did you mean 'WS_GATEWAY_PORT'?)"]


def test_to_toml_round_trips(tmp_path):
    original = cfg.load(None, env={}, overrides={"port": 1234, "log_format": "text", "drain_window": 0.5})
    original = original.replace(room_policies=(cfg.RoomPolicy("a.*", "latest", 10), cfg.RoomPolicy("b")))
    path = write(tmp_path, cfg.to_toml(original))
    assert cfg.load(path, env={}) == original


def test_tls_needs_both_files_and_readable_pem(tmp_path):
    with pytest.raises(ConfigError) as info:
        cfg.load(None, env={}, overrides={"certfile": "/etc/hostname"})
    assert info.value.errors == ["--certfile: certfile: native TLS needs keyfile too (the certificate's private key)"]
    with pytest.raises(ConfigError, match="--keyfile: keyfile: native TLS needs certfile too"):
        cfg.load(None, env={}, overrides={"keyfile": "/etc/hostname"})
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
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


def test_check_config_output_redacts_broker_password(tmp_path):
    from gateway.config import load, redact_url, to_toml
    path = tmp_path / "g.toml"
    path.write_text('broker = "redis://:hunter2-secret@127.0.0.1:6390/0"\n')
    text = to_toml(load(str(path), env={}))
    assert "hunter2-secret" not in text
    assert "redis://:<redacted>@127.0.0.1:6390/0" in text
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("rediss://user:pw@h:1") == "rediss://user:<redacted>@h:1"


def test_a_new_per_room_setting_is_one_line(monkeypatch, tmp_path):
    # What the history work (issue 14) will do: add fields to RoomPolicy, nothing else.
    import dataclasses as dc

    @dc.dataclass(frozen=True, slots=True)
    class Extended(cfg.RoomPolicy):
        history_size: int | None = cfg._rule(int, minimum=0)
        history_ttl: float | None = cfg._rule(float, minimum=0)

    monkeypatch.setattr(cfg, "RoomPolicy", Extended)
    monkeypatch.setattr(cfg, "_RULE_FIELDS", {f.name: f.metadata for f in dc.fields(Extended)})
    path = write(tmp_path, '[[rooms.policy]]\npattern = "chat.*"\nhistory_size = 100\nhistory_ttl = 30\n')
    loaded = cfg.load_with_sources(path, env={})
    assert loaded.config.room_policies == (Extended("chat.*", history_size=100, history_ttl=30.0),)
    assert cfg.load(write(tmp_path, cfg.to_toml(loaded.config), "again.toml"), env={}) == loaded.config
    bad = write(tmp_path, '[[rooms.policy]]\npattern = "a"\nhistory_size = -1\nhistory_ttl = "1h"\n', "bad.toml")
    with pytest.raises(ConfigError) as info:
        cfg.load(bad, env={})
    assert info.value.errors == [f"{bad}:3: rooms.policy[0].history_size: must be at least 0, got -1",
                                 f"{bad}:4: rooms.policy[0].history_ttl: expected a number, got the string '1h'"]


def test_history_settings_and_the_retired_redis_seq_ttl(tmp_path):
    """history_size/history_ttl/history_max_bytes are checked; a file that still sets the
    retired redis_seq_ttl loads with a warning saying what replaced it."""
    from gateway.config import load_with_sources
    from gateway.errors import ConfigError
    path = tmp_path / "gw.toml"
    path.write_text('redis_seq_ttl = 86400\nhistory_size = 5\nhistory_ttl = 60\n'
                    '[[rooms.policy]]\npattern = "t.*"\nhistory_size = 1\n')
    loaded = load_with_sources(str(path), env={})
    assert (loaded.config.history_size, loaded.config.history_ttl) == (5, 60)
    assert any("redis_seq_ttl is no longer used" in w and "history_ttl" in w for w in loaded.warnings)
    from gateway.rooms.history import RetentionTable
    table = RetentionTable.from_config(loaded.config)
    assert table.for_room("t.x") == (1, 60) and table.for_room("other") == (5, 60)
    for bad, field in (("history_size = -1", "history_size"), ("history_ttl = 0", "history_ttl"),
                       ("history_max_bytes = -5", "history_max_bytes"),
                       ('[[rooms.policy]]\npattern = "a"\nhistory_size = "x"', "history_size"),
                       ('[[rooms.policy]]\npattern = "a"\nhistory_ttl = 0', "history_ttl")):
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=field):
            load_with_sources(str(path), env={})


def test_max_fragments_default_matches_the_protocol_and_is_checked():
    from gateway_ext.constants import MAX_FRAGMENTS
    assert cfg.Config().max_fragments == MAX_FRAGMENTS   # config.py is a leaf: it keeps a copy
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(None, env={}, overrides={"max_fragments": 0})
    assert "max_fragments" in str(err.value)
    assert cfg.load(None, env={"WS_GATEWAY_MAX_FRAGMENTS": "65536"}).max_fragments == 65536
