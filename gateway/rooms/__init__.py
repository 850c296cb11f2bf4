"""Rooms: the Hub (membership, encode once, fan-out), the /ws session and its commands, slow-consumer queues. No transports, no Redis."""
