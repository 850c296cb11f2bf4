"""Leaves for operating the gateway: metrics, logs, systemd notify. They import nothing from the gateway but errors."""
