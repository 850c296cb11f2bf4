"""Brokers carry publications between gateway processes: memory (one process) or Redis.

`url.py` is the one parser of `--broker` URLs (config validation uses it too), so every URL
that passes `ws-gateway check-config` gets a broker here.
"""
from gateway.broker import url as broker_url
from gateway.broker.base import Broker, BrokerHandler, BrokerUnavailable


def create_broker(url: str, **options) -> Broker:
    """The broker for a `--broker` URL (forms: gateway/broker/url.py); ValueError if invalid."""
    if broker_url.parse(url).memory:
        from gateway.broker.memory import MemoryBroker
        return MemoryBroker()
    from gateway.broker.redis import RedisBroker  # imported lazily: memory users need no Redis client
    return RedisBroker(url, **options)


__all__ = ["Broker", "BrokerHandler", "BrokerUnavailable", "create_broker"]
