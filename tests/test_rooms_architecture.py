"""The arrows of the rooms feature point down (read from the source, not by importing it).

rooms -> broker.base, commands, gateway_ext; never the connection, sessions, transports or
redis. commands knows no WebSocket, broker or gateway module. backpressure is pure data
structures (plus `config`, for its section check). session reaches transports only
through the Connection it is given.
"""
import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"


def imports_of(module: str) -> set[str]:
    """Absolute names imported by gateway/<module>.py (relative imports resolved)."""
    tree = ast.parse((GATEWAY / f"{module}.py").read_text())
    package = "gateway"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                name = f"{base}.{node.module}" if node.module else base
                out.add(name)
                if not node.module:
                    out.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                out.add(node.module)
    return out


@pytest.mark.parametrize("module, allowed_gateway, forbidden", [
    ("rooms", {"gateway.commands", "gateway.broker.base"}, {"redis", "socket", "asyncio.transports"}),
    ("commands", set(), {"gateway_ext", "asyncio", "socket"}),
    ("backpressure", {"gateway", "gateway.config"}, {"asyncio", "socket", "gateway_ext"}),
    ("session", {"gateway", "gateway.commands", "gateway.backpressure", "gateway.broker.base", "gateway.errors",
                 "gateway.handshake"}, {"socket", "redis", "gateway_ext"}),
])
def test_imports_point_down(module, allowed_gateway, forbidden):
    names = imports_of(module)
    ours = {n for n in names if n.startswith("gateway.")}   # `from . import x` also yields "gateway"
    assert ours <= allowed_gateway, f"{module} imports {sorted(ours - allowed_gateway)}"
    bad = {n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)}
    assert not bad, f"{module} must not import {sorted(bad)}"
