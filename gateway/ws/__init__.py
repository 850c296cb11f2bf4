"""The WebSocket layer, sans-I/O: the HTTP upgrade (RFC 6455 section 4) and permessage-deflate (RFC 7692)."""
