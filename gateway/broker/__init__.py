"""Brokers carry publications between gateway processes: memory (one process) or Redis.

`url.py` is the one parser of `--broker` URLs (config validation uses it too), so every URL
that passes `ws-gateway check-config` gets a broker here.
"""
from gateway.broker import url as broker_url
from gateway.broker.base import Broker, BrokerHandler, BrokerUnavailable, History, Retention


def create_broker(url: str, *, retention=None, max_history_bytes: int | None = None, **redis_options) -> Broker:
    """The broker for a `--broker` URL (forms: gateway/broker/url.py); ValueError if invalid.

    `retention(room) -> Retention` sizes each room's history (both brokers);
    `max_history_bytes` caps the memory broker's history; `redis_options` go to RedisBroker.
    """
    if broker_url.parse(url).memory:
        from gateway.broker.memory import DEFAULT_MAX_HISTORY_BYTES, MemoryBroker
        return MemoryBroker(retention, max_history_bytes=DEFAULT_MAX_HISTORY_BYTES if max_history_bytes is None
                            else max_history_bytes)
    from gateway.broker.redis import RedisBroker  # imported lazily: memory users need no Redis client
    return RedisBroker(url, retention=retention, **redis_options)


def create_presence(url: str, **options):
    """The presence backend (broker.base.PresenceBackend) for the same `--broker` URL."""
    if url in ("", "memory", "memory://"):
        from gateway.broker.memory_presence import MemoryPresence
        return MemoryPresence()
    from gateway.broker.redis_presence import RedisPresence   # lazily, like the broker
    return RedisPresence(url, **options)


__all__ = ["Broker", "BrokerHandler", "BrokerUnavailable", "History", "Retention", "create_broker", "create_presence"]
