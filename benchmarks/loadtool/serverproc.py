"""What the server process costs, read from /proc (Linux): RSS, CPU seconds, open sockets.

The idle, churn and scale benchmarks judge a server by its process, not by what it says
about itself, so the same numbers come out for the gateway and for any peer. A server is
named either by its pid (`--server-pid`: that one process) or by its process group
(`--server-pgid`, what `compare` passes: every process of the group, e.g. the `sh -c`
wrapper and a multi-worker server's forks, summed). Everything returns None when /proc
cannot say (not Linux, the process is gone).
"""
import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pids_of(pid=None, pgid=None) -> list:
    """The process `pid`, or every live process of group `pgid`."""
    if pid:
        return [pid]
    if not pgid:
        return []
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue   # exited meanwhile
        # Fields after "(comm)" (comm may contain spaces): state ppid pgrp ...
        if int(stat[stat.rfind(b")") + 2:].split()[2]) == pgid:
            found.append(int(name))
    return found


def rss_bytes(pid=None, pgid=None):
    """Resident set size (VmRSS) of the process / the group, in bytes."""
    total = None
    for p in pids_of(pid, pgid):
        try:
            with open(f"/proc/{p}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total = (total or 0) + int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pid=None, pgid=None):
    """user + system CPU seconds used so far by the process / the group."""
    total = None
    for p in pids_of(pid, pgid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total = (total or 0) + int(fields[11]) + int(fields[12])
    return None if total is None else total / _TICKS


def open_sockets(pid=None, pgid=None):
    """Sockets held open by the process / the group (listening ones included)."""
    total = None
    for p in pids_of(pid, pgid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        count = 0
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                continue   # closed while we looked
        total = (total or 0) + count
    return total


def add_arguments(parser) -> None:
    parser.add_argument(
        "--server-pid", type=int, metavar="PID",
        help="the server process to weigh (RSS, CPU, sockets from /proc); default: --server-pgid's group",
    )


def target_of(params) -> dict:
    """{pid|pgid: ...} for the functions above, from --server-pid / --server-pgid."""
    pid = getattr(params, "server_pid", None)
    if pid:
        return {"pid": pid}
    pgid = getattr(params, "server_pgid", None)
    return {"pgid": pgid} if pgid else {}
