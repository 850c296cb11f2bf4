"""ws-gateway: a high-performance WebSocket gateway (rooms, fan-out, Redis clustering)."""
__version__ = "0.1.0"
