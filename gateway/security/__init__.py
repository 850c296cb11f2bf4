"""Admission: JWT auth, Origin and per-IP limits, rate limits, handshake defences."""
