"""The gateway's configuration: one dataclass, loaded from TOML, environment and flags.

Precedence (lowest to highest): defaults < TOML file (`--config FILE`) < environment
variables `WS_GATEWAY_<FIELD>` < command-line flags. Every field is validated once, here,
and an invalid value raises ConfigError naming its source and the reason.
Leaf module: imports only the standard library and `errors`.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "WS_GATEWAY_"


@dataclass(slots=True)
class Config:
    # listening
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    backlog: int = 4096
    # endpoints
    echo: bool = False                 # serve /echo (conformance tests, benchmarks)
    demo: bool = False                 # serve the demo page at /
    # protocol limits
    max_message_bytes: int = 1 << 20
    handshake_timeout: float = 10.0    # slowloris guard: head + upgrade must finish in this time
    ping_interval: float = 20.0        # ping a connection silent for this long; 0 disables
    ping_timeout: float = 20.0         # ... and close it if still silent this much later
    close_timeout: float = 5.0         # wait this long for the peer's close frame / EOF
    max_connections: int = 100_000     # per process; beyond it the upgrade gets 503
    # broker
    broker: str = "memory://"
    # logging
    log_level: str = "info"
    log_format: str = "json"
    # extra sections owned by later features (rooms, auth, metrics, ...): kept verbatim
    extra: dict = field(default_factory=dict)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


_FIELD_TYPES = {f.name: f.type for f in fields(Config) if f.name != "extra"}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected an integer, got a boolean")
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from None


def validate(config: Config) -> Config:
    errors = []
    if not 0 <= config.port <= 65535:
        errors.append(f"port: {config.port} is not a TCP port (0-65535)")
    if config.workers < 1:
        errors.append("workers: must be at least 1")
    if config.max_message_bytes < 125:
        errors.append("max_message_bytes: must be at least 125")
    for name in ("handshake_timeout", "close_timeout"):
        if getattr(config, name) <= 0:
            errors.append(f"{name}: must be positive")
    if config.ping_interval < 0 or config.ping_timeout <= 0:
        errors.append("ping_interval must be >= 0 (0 disables) and ping_timeout > 0")
    if config.log_format not in ("json", "text"):
        errors.append(f"log_format: {config.log_format!r} is not 'json' or 'text'")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        errors.append(f"log_level: {config.log_level!r} is not debug/info/warning/error")
    if config.workers > 1 and config.broker.startswith("memory"):
        errors.append("workers: N > 1 needs a shared broker (--broker redis://...); "
                      "with the memory broker rooms would silently split between processes")
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def load(path: str | None = None, env: dict[str, str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the effective configuration (see the module docstring for precedence)."""
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        for key, value in data.items():
            if key in _FIELD_TYPES:
                values[key] = _coerce(key, value, path)
            elif isinstance(value, dict):
                extra[key] = value
            else:
                raise ConfigError(f"{path}: unknown option {key!r}")
    env = os.environ if env is None else env
    for name in _FIELD_TYPES:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw, f"${ENV_PREFIX}{name.upper()}")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    return validate(Config(**values, extra=extra))
