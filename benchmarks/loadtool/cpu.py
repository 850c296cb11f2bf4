"""CPU use during the measurement window: of this client worker and of the server.

The numbers say which side was the bottleneck: a run where the server used ~100% of its
core while the client had headroom measured the server, not the client. Server CPU is
read from /proc for every process of a process group (`--server-pgid`, which compare
passes; a multi-worker server's forks share its group), so it is Linux-only and absent
elsewhere.
"""
import os
import resource
from time import perf_counter

# A client worker above this share of its core measured (partly) itself, not the server.
CLIENT_BOUND = 0.9

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_seconds(pgid: int):
    """user+system seconds of the live processes in group `pgid` (None if unreadable)."""
    total = 0
    found = False
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue   # exited meanwhile
        # Fields after "(comm)" (comm may contain spaces): state ppid pgrp ... utime stime.
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
            found = True
    return total / _TICKS if found else None


def _self_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """start() at the window's start, stop(extra) at its end: adds client/server CPU shares."""

    def __init__(self, server_pgid=None) -> None:
        self._pgid = server_pgid
        self._start = None

    def start(self) -> None:
        server = group_cpu_seconds(self._pgid) if self._pgid else None
        self._start = (perf_counter(), _self_seconds(), server)

    def stop(self, extra: dict) -> None:
        if self._start is None:
            return
        t0, c0, s0 = self._start
        wall = perf_counter() - t0
        if wall <= 0:
            return
        # Summed over workers by stats.merge: the client total in cores.
        extra["client_cpu"] = round((_self_seconds() - c0) / wall, 3)
        if s0 is not None:
            s1 = group_cpu_seconds(self._pgid)
            if s1 is not None:
                extra["server_cpu"] = round((s1 - s0) / wall, 3)


def client_bound(extra: dict, procs: int = 1) -> bool:
    """True when the client workers used more than CLIENT_BOUND of their cores on average
    (then the rate is a lower bound of the server's, not its capacity)."""
    cpu = extra.get("client_cpu")
    return cpu is not None and cpu / max(1, procs) > CLIENT_BOUND
