"""Fixtures shared by every test module.

`run` executes an async test body on both event loops the gateway supports (asyncio and
uvloop), so every integration test proves the code is loop-agnostic.
"""
import asyncio

import pytest
import uvloop


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    def runner(coro):
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)
    runner.loop_name = request.param
    return runner
