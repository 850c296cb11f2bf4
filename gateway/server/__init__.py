"""The only package that touches sockets and transports: listeners, connections, endpoints, static files."""
