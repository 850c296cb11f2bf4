"""Run a mode in `--procs` worker processes that measure the same window, and merge.

Each worker runs its share of the load on its own uvloop loop. Workers open their
connections first, then wait at a barrier, so no worker measures while another is still
connecting; each then times its own window and the parent adds the rates up. With one
process everything runs in-process (no fork), which is also what tests and profilers see.

Workers are forked (not spawned): startup is instant and nothing needs re-importing. The
parent starts no event loop before forking. Every wait is bounded so the tool always ends.
"""
import asyncio
import gc
import multiprocessing
import sys
import threading

import uvloop

from .modes import WorkerContext
from .stats import WorkerResult, merge
from .wsclient import parse_url

# Slack on top of warmup + duration + the opening phase before the parent gives up on a worker.
_PARENT_SLACK = 30.0


def run(mode, params):
    """Run `mode` with `params` (argparse.Namespace) and return a stats.Summary."""
    target = parse_url(params.url)
    mode.before_workers(params)
    if params.procs <= 1:
        result = uvloop.run(_worker(mode, WorkerContext(params, target, 0, 1), None, params))
        summary = merge([result])
    else:
        summary = merge(_run_forked(mode, params, target))
    mode.finish(summary, params)
    return summary


def _phase_budget(params) -> float:
    return params.open_timeout + params.warmup + params.duration + params.close_timeout + _PARENT_SLACK


def _run_forked(mode, params, target):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(params.procs)
    children = []
    for index in range(params.procs):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child_main, args=(mode, params, target, index, barrier, writer), daemon=True
        )
        proc.start()
        writer.close()
        children.append((proc, reader))
    results = []
    budget = _phase_budget(params)
    for index, (proc, reader) in enumerate(children):
        result = None
        if reader.poll(budget):
            try:
                result = reader.recv()
            except EOFError:
                pass
        if result is None:
            result = WorkerResult()
            result.error(f"worker {index} died or timed out")
        results.append(result)
        reader.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()   # only our own child, by its handle
            proc.join(5)
    return results


def _child_main(mode, params, target, index, barrier, writer) -> None:
    try:
        result = uvloop.run(_worker(mode, WorkerContext(params, target, index, params.procs), barrier, params))
    except BaseException as exc:  # report instead of dying silently
        result = WorkerResult()
        result.error(f"worker crashed: {exc!r}"[:120])
    writer.send(result)
    writer.close()


async def _worker(mode, ctx, barrier, params):
    result = WorkerResult()
    try:
        async with asyncio.timeout(params.open_timeout + 5):
            prepared = await mode.prepare(ctx, result)
    except TimeoutError:
        result.error("opening phase timed out")
        prepared = None
    if barrier is not None:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, barrier.wait, params.open_timeout + 10)
        except threading.BrokenBarrierError:
            result.error("another worker failed to start")
    # Nothing but connection objects is allocated in cycles during a run; the collector
    # would only add pauses that look like server latency.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await mode.run(ctx, prepared, result)
    finally:
        gc.enable()
        gc.unfreeze()
    return result


def warn(message: str) -> None:
    print(f"loadtool: {message}", file=sys.stderr, flush=True)
