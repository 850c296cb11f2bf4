"""Throwaway Redis servers for tests: one node, a Redis Cluster (3 primaries, optionally each
with a replica), or a primary + replica watched by three Sentinels, on free ports.

Each server runs from its own temp directory with persistence off, listens only on
127.0.0.1 (and optionally a Unix socket), and can be killed and restarted on the same
port so tests can take Redis away mid-stream. The system Redis on 6379 is never used.
Fixtures: `redis_server` (per test), `redis_cluster` (per module: creating a cluster
costs a second or two). `RedisCluster(replicas=1)` and `RedisSentinels` are for failover
tests, which kill primaries and wait for a replica to take over. Imports redis-py only for
readiness probes and topology questions.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import redis

from tests.helpers import free_port
from tests.requires import binary, require, requires

REDIS_SERVER = binary("redis-server") or "redis-server"
REDIS_CLI = binary("redis-cli") or "redis-cli"
# For modules that start their own servers (clusters, sentinels) rather than use a fixture.
needs_redis = requires("redis-server", "redis-cli")


def _wait(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until true or raise: used only for external processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


class RedisServer:
    """`redis-server` on 127.0.0.1:<free port>; `kill()` / `restart()` keep the port."""

    def __init__(self, port: int | None = None, *, unix_socket: bool = False, cluster: bool = False,
                 tls: tuple[str, str] | None = None, password: str | None = None, extra_args: tuple = ()) -> None:
        """`tls`: (certfile, keyfile) to also listen with TLS on `tls_port` (clients need no
        certificate; with `cluster`, the cluster bus and the announced ports are TLS too).
        `password`: the default user's (requirepass). `extra_args`: more redis-server options."""
        require("redis-server")   # skips the test, saying what to install, where Redis is missing
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.password = password
        self.extra_args = tuple(extra_args) + (("--requirepass", password) if password else ())
        self._port_chosen = port is None   # ours to change if another process takes it first
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-")
        self.unix_path = os.path.join(self.dir, "redis.sock") if unix_socket else None
        self.cluster = cluster
        # The cluster bus defaults to port+10000, which may be taken or out of range: pick it too.
        self.bus_port = free_port() if cluster else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    def args(self) -> list[str]:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.unix_path:
            args += ["--unixsocket", self.unix_path, "--unixsocketperm", "700"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                     "--cluster-node-timeout", "2000", "--cluster-port", str(self.bus_port)]
        if self.tls:
            cert, key = self.tls
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]
            if self.cluster:
                args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        return [*args, *self.extra_args]

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, password=self.password)

    def start(self, timeout: float = 10.0) -> "RedisServer":
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                # free_port() releases the port before redis binds it: another process can
                # win the race. A port we picked ourselves (never one a restart must keep,
                # i.e. before the first successful start) is simply picked again.
                if "Address already in use" not in str(exc) or not self._port_chosen or attempt == 2:
                    raise
                self.port = free_port()
                if self.cluster:
                    self.bus_port = free_port()
                if self.tls:
                    self.tls_port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "RedisServer":
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
            with self.client() as c:
                return c.ping()
        _wait(up, timeout, f"redis-server on port {self.port}")
        self._port_chosen = False   # from now on restart() must come back on the same port
        return self

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: clients see their connections reset, as after a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class RedisCluster:
    """Three cluster-enabled primaries joined with `redis-cli --cluster create`, each with
    `replicas` replicas (`--cluster-replicas`). `extra_args` go to every node, e.g.
    ("--cluster-require-full-coverage", "no") so that the other shards keep serving while one
    is lost entirely."""

    def __init__(self, size: int = 3, replicas: int = 0, extra_args: tuple = (), *,
                 tls: tuple[str, str] | None = None) -> None:
        require("redis-server", "redis-cli")
        self.replicas = replicas
        self.nodes = [RedisServer(cluster=True, tls=tls, extra_args=extra_args) for _ in range(size * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> "RedisCluster":
        for node in self.nodes:
            node.start()
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        return self.wait_whole(timeout)

    def wait_whole(self, timeout: float = 60.0) -> "RedisCluster":
        """Until every node agrees the cluster is ok and every primary has its replicas in sync
        (after start, or after a test killed and restarted nodes)."""

        def ok() -> bool:
            for node in self.nodes:
                with node.client() as c:
                    info = c.execute_command("CLUSTER INFO")
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                        return False
            # Every replica attached and in sync: a failover needs one that can take over.
            with self.nodes[0].client() as c:
                return all(len(entry) - 3 >= self.replicas for entry in c.execute_command("CLUSTER SLOTS"))
        _wait(ok, timeout, "the cluster to agree (cluster_state:ok, replicas attached)")
        if self.replicas:
            _wait(lambda: all(self._replica_synced(n) for n in self.nodes if self.role(n) == "slave"), timeout,
                  "the replicas to sync")
        return self

    def _replica_synced(self, node: RedisServer) -> bool:
        with node.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    def role(self, node: RedisServer) -> str:
        """ "master" or "slave", as the node says (ROLE)."""
        with node.client() as c:
            return c.execute_command("ROLE")[0].decode()

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def slots(self) -> list:
        """CLUSTER SLOTS from a live node: [(start, end, primary port, [replica ports])]."""
        for node in self.live():
            try:
                with node.client() as c:
                    return [(s, e, p[1], [r[1] for r in rs]) for s, e, p, *rs in c.execute_command("CLUSTER SLOTS")]
            except (redis.RedisError, OSError):
                continue
        raise LookupError("no live cluster node")

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        ports = {r for _, _, p, rs in self.slots() if p == primary.port for r in rs}
        return [n for n in self.nodes if n.port in ports]

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def node_for(self, key: bytes) -> RedisServer:
        """The primary that owns `key`'s slot (asked of the cluster, not computed here)."""
        with self.live()[0].client() as c:
            slot = c.execute_command("CLUSTER KEYSLOT", key)
        for start, end, primary, _ in self.slots():
            if start <= slot <= end:
                return self.by_port(primary)
        raise LookupError(key)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class RedisSentinels:
    """A primary, one replica and three Sentinels (`redis-server --sentinel`) watching them as
    service `name`; quorum 2, a primary silent for `down_after_ms` is failed over."""

    def __init__(self, name: str = "mymaster", down_after_ms: int = 1000) -> None:
        self.name = name
        self.down_after_ms = down_after_ms
        self.primary = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.name}"

    def start(self, timeout: float = 30.0) -> "RedisSentinels":
        self.primary.start()
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.primary.port))).start()
        _wait(lambda: self.replica.client().info("replication").get("master_link_status") == "up", timeout,
              "the replica to sync")
        for _ in range(3):
            sentinel = _Sentinel(self)
            sentinel.start()
            self.sentinels.append(sentinel)

        def agreed() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as c:
                    state = c.sentinel_master(self.name)
                    if state.get("num-other-sentinels") != 2 or state.get("num-slaves") != 1:
                        return False
            return True
        _wait(agreed, timeout, "the sentinels to find each other and the replica")
        return self

    def current_primary_port(self) -> int | None:
        """The primary's port as a majority of the sentinels report it."""
        ports = []
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    ports.append(int(c.sentinel_get_master_addr_by_name(self.name)[1]))
            except (redis.RedisError, OSError, TypeError):
                pass
        for port in set(ports):
            if ports.count(port) >= 2:
                return port
        return None

    def node(self, port: int) -> RedisServer:
        return next(n for n in (self.primary, self.replica) if n.port == port)

    def close(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            if server is not None:
                server.close()

    def __enter__(self) -> "RedisSentinels":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _Sentinel(RedisServer):
    """`redis-server sentinel.conf --sentinel` (Debian ships no separate redis-sentinel binary).
    Sentinel rewrites its config file, so it lives in the node's own temp directory."""

    def __init__(self, group: RedisSentinels) -> None:
        super().__init__()
        self.group = group

    def args(self) -> list[str]:
        conf = os.path.join(self.dir, "sentinel.conf")
        if not os.path.exists(conf):
            g = self.group
            with open(conf, "w") as fh:
                fh.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                         f"logfile {os.path.join(self.dir, 'redis.log')}\n"
                         f"sentinel monitor {g.name} 127.0.0.1 {g.primary.port} 2\n"
                         f"sentinel down-after-milliseconds {g.name} {g.down_after_ms}\n"
                         f"sentinel failover-timeout {g.name} 10000\n"
                         f"sentinel parallel-syncs {g.name} 1\n")
        return [REDIS_SERVER, conf, "--sentinel"]


@pytest.fixture
def redis_server():
    with RedisServer(unix_socket=True) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster():
    with RedisCluster() as cluster:
        yield cluster
