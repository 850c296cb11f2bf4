"""Benchmarks and the load tool of ws-gateway (never collected by the default test run)."""
