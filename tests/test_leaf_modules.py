"""The leaf modules (config, errors, logs, metrics, systemd) import nothing from `gateway`
but `errors`, so that anything may import them without cycles (ARCHITECTURE.md)."""
import ast
import os

import pytest

from tests.helpers import ROOT

LEAVES = ["config", "errors", "logs", "metrics", "systemd"]


def _gateway_imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:   # from .x import y / from . import y
                base = node.module or ""
                names = [base] if base else [alias.name for alias in node.names]
                found.update(f"gateway.{n}" for n in names)
            elif node.module and (node.module == "gateway" or node.module.startswith("gateway.")):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "gateway" or a.name.startswith("gateway."))
    return found


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_imports_only_errors(leaf):
    imports = _gateway_imports(os.path.join(ROOT, "gateway", f"{leaf}.py"))
    assert imports <= {"gateway.errors"}, f"gateway/{leaf}.py imports {sorted(imports - {'gateway.errors'})}"


def test_the_checker_sees_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from . import server\nfrom .errors import ConfigError\nimport gateway.app\n")
    assert _gateway_imports(str(path)) == {"gateway.server", "gateway.errors", "gateway.app"}
