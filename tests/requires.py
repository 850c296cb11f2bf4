"""External programs some tests need, and what to install when one is missing.

`binary(name)` finds a program (on PATH, then in /usr/sbin and /sbin, where Debian puts nginx);
`require(name)` returns its path or skips the calling test with a reason that says what to
install; `requires(name)` is the same as a mark (`pytestmark = requires("nginx")`).

So `python -m pytest -q` passes on a machine with only Python and a C compiler: the tests
that need redis-server, nginx or Chromium skip and say how to get them. CI must run them
all: with WS_GATEWAY_TEST_REQUIRE_ALL=1 (set by .ci/run) `require` fails instead of
skipping, and conftest.py fails the run if any test was skipped because a program "is not
installed" (whichever helper skipped it).
"""
from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ALL_ENV = "WS_GATEWAY_TEST_REQUIRE_ALL"
_SBIN = ("/usr/sbin", "/sbin")

# program -> (alternative names, how to install it)
PROGRAMS = {
    "redis-server": ((), "apt-get install redis-server (macOS: brew install redis)"),
    "redis-cli": ((), "apt-get install redis-server (it brings redis-cli; macOS: brew install redis)"),
    "nginx": ((), "apt-get install nginx (macOS: brew install nginx)"),
    "chromium": (("chromium-browser", "google-chrome"), "apt-get install chromium"),
    "chromedriver": ((), "apt-get install chromium-driver"),
    "openssl": ((), "apt-get install openssl"),
    "systemd-analyze": ((), "apt-get install systemd"),
    "node": (("nodejs",), "Node.js 20+ (apt-get install nodejs, or nodesource's package)"),
}


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV, "") not in ("", "0")


def binary(name: str) -> str | None:
    """The path of program `name` (or one of its alternative names), or None."""
    alternatives, _ = PROGRAMS.get(name, ((), ""))
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    for candidate in (name, *alternatives):
        path = shutil.which(candidate, path=search)
        if path:
            return path
    return None


def reason(*names: str) -> str:
    """Why a test cannot run: the missing programs and how to install each."""
    missing = [n for n in names if binary(n) is None]
    hints = "; ".join(f"{n}: {PROGRAMS.get(n, ((), 'install it'))[1]}" for n in missing)
    return f"needs {', '.join(missing)}, not installed ({hints}; .ci/run installs every one)"


def require(*names: str, module_level: bool = False) -> str:
    """The path of the first program; skip (or, under WS_GATEWAY_TEST_REQUIRE_ALL=1, fail)
    the calling test -- or with `module_level`, the whole module -- when any is missing."""
    if any(binary(n) is None for n in names):
        if require_all():
            pytest.fail(f"{reason(*names)} [{REQUIRE_ALL_ENV}=1: missing programs fail]", pytrace=False)
        pytest.skip(reason(*names), allow_module_level=module_level)
    return binary(names[0])


def requires(*names: str) -> pytest.MarkDecorator:
    """`require` as a mark, for a test or a module (`pytestmark`)."""
    missing = any(binary(n) is None for n in names)
    return pytest.mark.skipif(missing, reason=reason(*names) if missing else "")
