"""Brokers carry publications between gateway processes: memory (one process) or Redis."""
from gateway.broker.base import Broker, BrokerHandler, BrokerUnavailable


def create_broker(url: str, **options) -> Broker:
    """The broker for a `--broker` URL: memory:// (default) or redis:// / rediss:// / unix://."""
    if url in ("", "memory", "memory://"):
        from gateway.broker.memory import MemoryBroker
        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
        from gateway.broker.redis import RedisBroker  # imported lazily: memory users need no Redis client
        return RedisBroker(url, **options)
    raise ValueError(f"unsupported broker URL {url!r}: use memory:// or redis://host:port/db")


__all__ = ["Broker", "BrokerHandler", "BrokerUnavailable", "create_broker"]
