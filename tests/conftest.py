"""Fixtures shared by every test module.

`run` executes an async test body on both event loops the gateway supports (asyncio and
uvloop), so every integration test proves the code is loop-agnostic.

With WS_GATEWAY_TEST_REQUIRE_ALL=1 (.ci/run) a run in which a test was skipped because a program
is not installed fails: CI installs them all (see tests/requires.py). Other skips (a feature
another issue will bring, a machine without a non-loopback address) are listed and allowed.
"""
import asyncio

import pytest
import uvloop

from tests.requires import REQUIRE_ALL_ENV, require_all

_skipped: list[str] = []


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "not installed" in reason:   # tests/requires.py's reasons, and any ad-hoc one alike
            _skipped.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if require_all() and _skipped:
        terminalreporter.section(f"{REQUIRE_ALL_ENV}=1: tests skipped for a missing program fail the run", red=True)
        for line in _skipped:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if require_all() and _skipped and exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    def runner(coro):
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)
    runner.loop_name = request.param
    return runner
