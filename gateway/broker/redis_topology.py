"""Where the Redis primaries are: Sentinel discovery and the Redis Cluster slot map.

Role. The Redis broker (`gateway.broker.redis`) owns the connections, the publish pipeline
and the pub/sub readers; this module only answers "which primary serves what", each time
the broker (re)connects or repairs a shard:

- Sentinel (`redis+sentinel://host:port,host:port/service-name[/db]`): redis-py's asyncio
  `Sentinel` asks the sentinels, in turn, for the service's current primary, skipping one
  they consider down (`discover_master`). The broker then checks with ROLE that the node it
  reached really is a primary: right after a failover a sentinel may still name the old one.
- Cluster (`redis+cluster://seed,seed`): CLUSTER SLOTS from the first seed (or known node)
  that answers, as one address per primary and a slot -> primary index table.

Imports redis-py and gateway.broker.url (the URL parser) only; never the hub, the config
or the rest of the broker.
"""
from __future__ import annotations

import asyncio

from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from gateway.broker import url as broker_url


class SentinelSpec:
    """A parsed `redis+sentinel://` URL: the sentinels, the service name and the primary's options."""

    __slots__ = ("sentinels", "service", "node", "sentinel_password", "_client")

    def __init__(self, sentinels: list[tuple[str, int]], service: str, node: dict,
                 sentinel_password: str | None = None) -> None:
        self.sentinels = sentinels
        self.service = service
        self.node = node                      # connection kwargs for the primary, host/port filled in later
        self.sentinel_password = sentinel_password
        self._client = None

    async def primary(self, timeout: float) -> tuple[str, int]:
        """The service's current primary as the sentinels see it (MasterNotFoundError if none)."""
        if self._client is None:
            from redis.asyncio.sentinel import Sentinel
            kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
            if self.sentinel_password:
                kwargs["password"] = self.sentinel_password
            self._client = Sentinel(self.sentinels, sentinel_kwargs=kwargs)
        async with asyncio.timeout(timeout * max(1, len(self.sentinels))):
            host, port = await self._client.discover_master(self.service)
        return host, int(port)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            for sentinel in client.sentinels:
                try:
                    await sentinel.aclose()
                except Exception:  # noqa: BLE001 - closing sockets we are throwing away
                    pass


def parse_sentinel_url(url: str) -> SentinelSpec:
    """A `redis+sentinel://` URL (checked by gateway.broker.url, the one parser) as a SentinelSpec.

    The credentials and TLS (`rediss+sentinel`) apply to the Redis primary; the sentinels are
    asked without a password unless `sentinel_password` is given. ValueError if invalid."""
    parsed = broker_url.parse(url)
    if not parsed.sentinel:
        raise ValueError("not a redis+sentinel:// URL")
    node = parse_url(parsed.nodes[0])
    node.pop("host", None)
    node.pop("port", None)
    return SentinelSpec(list(parsed.sentinels), parsed.service, node, parsed.params.get("sentinel_password"))


def cluster_nodes(ranges, seed: dict) -> tuple[list[dict], list[int]]:
    """CLUSTER SLOTS reply -> (connection kwargs per primary, slot -> index); RedisError if a slot is unowned."""
    nodes: list[dict] = []
    index: dict[tuple, int] = {}
    slots = [-1] * 16384
    for start, end, primary, *_replicas in ranges:
        host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
        addr = (host or seed.get("host", "127.0.0.1"), int(primary[1]))
        if addr not in index:
            index[addr] = len(nodes)
            nodes.append({**seed, "host": addr[0], "port": addr[1]})
        slots[start:end + 1] = [index[addr]] * (end - start + 1)
    if -1 in slots:
        raise RedisError("cluster does not cover every slot")
    return nodes, slots
