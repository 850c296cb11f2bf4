"""Tests that need redis-server or Chromium skip, saying what to install, where those are missing;
under WS_GATEWAY_TEST_REQUIRE_ALL=1 (.ci/run) the same run fails. Checked by running real test
modules in a pytest subprocess whose PATH has none of the programs."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.requires import REQUIRE_ALL_ENV, binary, reason, require

# One Redis test (fixture redis_server), the cluster fixture, and a Chromium test.
SELECTED = ["tests/system/test_redis_broker.py::test_interest_based_subscriptions",
            "tests/system/test_broker_contract.py::test_start_reports_connected[asyncio-redis-cluster]",
            "tests/system/test_deflate_chromium.py"]


def _pytest(tmp_path, *args, require_all=False):
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ALL_ENV}
    env["PATH"] = str(tmp_path)           # no redis-server, redis-cli, chromium here
    env["PYTHONPATH"] = ROOT
    if require_all:
        env[REQUIRE_ALL_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_missing_programs_skip_with_what_to_install(tmp_path):
    if binary("redis-server") and binary("redis-server").startswith(("/usr/sbin", "/sbin")):
        pytest.skip("redis-server is in an sbin directory here, which binary() always searches")
    result = _pytest(tmp_path, *SELECTED)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "needs redis-server, not installed (redis-server: apt-get install redis-server" in out
    assert "needs chromium, not installed (chromium: apt-get install chromium" in out
    assert "skipped" in out.splitlines()[-1] and "failed" not in out.splitlines()[-1]


def test_require_all_turns_those_skips_into_a_failed_run(tmp_path):
    result = _pytest(tmp_path, *SELECTED, require_all=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{REQUIRE_ALL_ENV}=1" in result.stdout
    assert "needs redis-server, not installed" in result.stdout


def test_require_names_the_missing_program(monkeypatch):
    monkeypatch.delenv(REQUIRE_ALL_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs no-such-program-x, not installed"):
        require("no-such-program-x")
    monkeypatch.setenv(REQUIRE_ALL_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="missing programs fail"):
        require("no-such-program-x")
    assert "apt-get install nginx" in reason("nginx") or binary("nginx")


def test_only_skips_for_a_missing_program_fail_the_run(tmp_path):
    # The run's own conftest hooks, on two tests: a deliberate skip passes, a missing program fails.
    (tmp_path / "conftest.py").write_text("from tests.conftest import (pytest_collectreport, pytest_runtest_logreport,"
                                          " pytest_sessionfinish, pytest_terminal_summary)  # noqa: F401\n")
    (tmp_path / "test_two.py").write_text(
        "import pytest\n"
        "def test_later():\n    pytest.skip('comes with issue 14')\n"
        "def test_program():\n    pytest.skip('node is not installed')\n")
    env = {**os.environ, "PYTHONPATH": ROOT, REQUIRE_ALL_ENV: "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)]
    both = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    listed = both.stdout.split("fail the run", 1)[-1]
    assert both.returncode == 1 and "test_two.py::test_program: Skipped: node is not installed" in listed, both.stdout
    assert "comes with issue 14" not in listed
    deliberate = subprocess.run([*args[:-1], str(tmp_path / "test_two.py") + "::test_later"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
    assert deliberate.returncode == 0 and "1 skipped" in deliberate.stdout, deliberate.stdout
