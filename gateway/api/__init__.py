"""The backend's side: the HTTP server API (POST /api/<method>)."""
