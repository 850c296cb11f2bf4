"""The Mode interface and the registry of modes.

A mode is one kind of load (echo, handshake; later fanout, idle, churn, slow). The runner
drives every mode the same way, in each worker process:

    prepared = await mode.prepare(ctx, result)   # open connections etc.; not timed
    -- all worker processes meet at a barrier --
    await mode.run(ctx, prepared, result)        # warmup, then the measurement window

and the parent merges the WorkerResults (stats.merge). To add a mode: write a module with
a Mode subclass and add it to `MODES` in registry.py; cli.py picks up its arguments.
"""
from dataclasses import dataclass

from .cpu import CpuMeter
from .stats import WorkerResult
from .wsclient import SourceAddresses, Target


@dataclass
class WorkerContext:
    """What one worker process knows: its parameters and its share of the load."""

    params: object          # argparse.Namespace (picklable, so it crosses fork/spawn)
    target: Target
    index: int              # this worker's number, 0..procs-1
    procs: int

    def share(self, total: int) -> tuple[int, int]:
        """(first global index, count) of this worker's part of `total` units."""
        base, extra = divmod(total, self.procs)
        count = base + (1 if self.index < extra else 0)
        first = self.index * base + min(self.index, extra)
        return first, count

    def cpu_meter(self) -> CpuMeter:
        """Measures this worker's CPU, and worker 0 also the server's (--server-pgid)."""
        return CpuMeter(self.params.server_pgid if self.index == 0 else None)

    def sources(self, first: int) -> SourceAddresses:
        # Start the round-robin at the global index so all workers together spread
        # connections evenly over the source addresses.
        return SourceAddresses(self.params.source_address or (), start=first)


class Mode:
    name = ""
    help = ""
    unit = "ops/s"           # what `rate` counts, for humans
    rate_key = "ops_per_s"   # the name of the rate in the RESULT line

    def add_arguments(self, parser) -> None:
        pass

    def params(self, args) -> dict:
        """The parameters worth recording in the RESULT line."""
        return {}

    async def prepare(self, ctx: WorkerContext, result: WorkerResult):
        return None

    async def run(self, ctx: WorkerContext, prepared, result: WorkerResult) -> None:
        raise NotImplementedError

    def before_workers(self, params) -> None:
        """In the parent, before any worker starts (e.g. a server baseline); may set
        attributes on `params`, which the forked workers inherit."""

    def finish(self, summary, params) -> None:
        """In the parent, after the workers' results are merged: derive numbers that need
        every worker's share (e.g. server bytes per connection held by all workers)."""
