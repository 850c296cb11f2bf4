"""Sans-I/O HTTP/1.1 request parsing and the WebSocket opening handshake (RFC 6455 section 4).

Theory of operation: the connection feeds the bytes it has so far to `parse_request()`;
it answers None (need more bytes), a `Request`, or raises `HandshakeRejected` carrying the
HTTP status to answer with. Every limit is hard and checked before anything is allocated
in proportion to the input: request line, header count, total header bytes. A WebSocket
request is then checked by `validate_upgrade()`, and `accept()` / `reject()` build the
response bytes. No sockets here; no imports from the rest of `gateway` but `errors`.

Strict where leniency lets two parsers disagree (a proxy and this one: request smuggling,
RFC 9112 section 11.2): control characters in the head, a missing, empty or repeated Host,
Transfer-Encoding with Content-Length, unknown transfer codings, and numbers that are not
plain ASCII digits are refused here, for every request, before any route sees it.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

from gateway.errors import HandshakeRejected

# RFC 6455 section 1.3: the GUID concatenated with the client's key.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16384
# Longest Content-Length taken as a number: 18 digits fit any body size we could accept,
# and int() of a longer string is slow (quadratic) or refused (sys.int_max_str_digits).
MAX_LENGTH_DIGITS = 18

# RFC 9110 section 5.5: a field value containing CR, LF or NUL must be rejected (or those
# replaced); other control characters are not field-vchars either (HTAB is whitespace).
# Lines end with CRLF (RFC 9112 section 2.2). So the head is clean exactly when its only
# control bytes are the CR LF pairs: deleting every control byte must remove 2 per pair.
# Two C-level passes (~1 us for a browser's 600-byte head; a regex with look-arounds
# for bare CR/LF cost 10 us).
_CONTROL_BYTES = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"

_REASONS = {
    101: "Switching Protocols", 200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable",
}


def ascii_digits(text: str) -> bool:
    """True for a non-empty run of the ASCII digits 0-9 only.

    `str.isdigit()` also accepts other Unicode digits ('²', '٣') that `int()` then refuses
    or reads differently: every number taken from a client goes through this instead.
    """
    return text.isascii() and text.isdigit()


@dataclass(slots=True)
class Request:
    """An HTTP request head. Header names are lower-cased; repeated headers are joined with ', '."""

    method: str
    target: str
    path: str
    query: str
    headers: dict[str, str]
    head_bytes: int = 0
    peer: str = ""
    extra: dict = field(default_factory=dict)
    version: str = "HTTP/1.1"

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def tokens(self, name: str) -> list[str]:
        """Comma-separated header values, lower-cased (RFC 9110 section 5.6.1)."""
        return [t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()]

    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    @property
    def is_upgrade(self) -> bool:
        return "websocket" in self.tokens("upgrade")


def parse_request(data: bytes | bytearray, peer: str = "") -> Request | None:
    """Parse a request head from `data`; None while the blank line has not arrived."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        first = data.find(b"\r\n")
        if (first < 0 and len(data) > MAX_REQUEST_LINE) or first > MAX_REQUEST_LINE:
            raise HandshakeRejected(414, "request line too long")
        if len(data) > MAX_HEADER_BYTES:
            raise HandshakeRejected(431, "request headers too large")
        return None
    if end + 4 > MAX_HEADER_BYTES:
        raise HandshakeRejected(431, "request headers too large")
    raw = bytes(data[:end])
    if len(raw) - len(raw.translate(None, _CONTROL_BYTES)) != 2 * raw.count(b"\r\n"):
        raise HandshakeRejected(400, "control character (NUL, bare CR or LF) in the request head")
    head = raw.decode("latin-1")   # every byte decodes: obs-text stays as is
    lines = head.split("\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HandshakeRejected(414, "request line too long")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/"):
        raise HandshakeRejected(400, "malformed request line")
    method, target, version = parts
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        raise HandshakeRejected(400, f"unsupported HTTP version {version[:16]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise HandshakeRejected(431, f"more than {MAX_HEADERS} request headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # RFC 9112 section 5.1: no whitespace between the field name and the colon;
        # obsolete line folding is rejected (section 5.2).
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise HandshakeRejected(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key == "host":
                # RFC 9112 section 3.2: more than one Host line is a 400.
                raise HandshakeRejected(400, "more than one Host header")
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    host = headers.get("host")
    if host is None:
        if version == "HTTP/1.1":   # RFC 9112 section 3.2: HTTP/1.1 requests must carry Host
            raise HandshakeRejected(400, "missing Host header")
    elif not host:
        raise HandshakeRejected(400, "empty Host header")
    if "transfer-encoding" in headers:
        _check_transfer_encoding(headers)
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise HandshakeRejected(400, "request target must be an absolute path")
    return Request(method=method, target=target, path=unquote(path), query=query,
                   headers=headers, head_bytes=end + 4, peer=peer, version=version)


def _check_transfer_encoding(headers: dict[str, str]) -> None:
    """RFC 9112 section 6: the framing of a request body we cannot misread."""
    if "content-length" in headers:
        # Section 6.3 item 3: both is how request smuggling starts; refuse rather than pick one.
        raise HandshakeRejected(400, "Transfer-Encoding and Content-Length together")
    codings = [t.strip().lower() for t in headers["transfer-encoding"].split(",")]
    if any(c != "chunked" for c in codings):
        # Section 6.1: a transfer coding the server does not understand -> 501.
        raise HandshakeRejected(501, "unsupported Transfer-Encoding (only chunked is defined here)")


def content_length(request: Request) -> int:
    """The request body's length from Content-Length (0 when absent), RFC 9110 section 8.6.

    ASCII digits only; a repeated header with different values (joined as "5, 6") is not a
    number and answers 400 (RFC 9112 section 6.3 item 5).
    """
    text = request.headers.get("content-length")
    if text is None:
        return 0
    if not ascii_digits(text):
        raise HandshakeRejected(400, "invalid Content-Length")
    if len(text) > MAX_LENGTH_DIGITS:
        raise HandshakeRejected(413, "request body too large")
    return int(text)


def validate_upgrade(request: Request) -> str:
    """Check a WebSocket opening handshake (RFC 6455 section 4.2.1); return the client key."""
    if request.method != "GET":
        raise HandshakeRejected(405, "WebSocket upgrade requires GET", {"Allow": "GET"})
    if request.version != "HTTP/1.1":
        # RFC 6455 section 4.1: the opening handshake is an HTTP/1.1 (or later) request.
        raise HandshakeRejected(400, "WebSocket upgrade requires HTTP/1.1")
    if "host" not in request.headers:
        raise HandshakeRejected(400, "missing Host header")
    headers = request.headers
    if "transfer-encoding" in headers or ("content-length" in headers and content_length(request)):
        # A GET upgrade has no body: bytes after the head are WebSocket frames here, while a
        # proxy would forward them as a body. Refuse the ambiguity (RFC 9112 section 11.2).
        raise HandshakeRejected(400, "a WebSocket upgrade request has no body")
    if "websocket" not in request.tokens("upgrade"):
        raise HandshakeRejected(426, "missing 'Upgrade: websocket'", {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"})
    if "upgrade" not in request.tokens("connection"):
        raise HandshakeRejected(400, "missing 'Connection: Upgrade'")
    version = request.header("sec-websocket-version")
    if version != "13":
        # RFC 6455 section 4.4: answer with the versions we speak.
        raise HandshakeRejected(426, f"unsupported WebSocket version {version[:16]!r}; this server speaks 13",
                                {"Sec-WebSocket-Version": "13"})
    key = request.header("sec-websocket-key")
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeRejected(400, "Sec-WebSocket-Key must be 16 bytes, base64-encoded")
    return key


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client key (RFC 6455 section 4.2.2, item 5.4)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def select_subprotocol(request: Request, supported: tuple[str, ...]) -> str | None:
    """First subprotocol of ours the client offered, in the server's preference order."""
    offered = [p.strip() for p in request.header("sec-websocket-protocol").split(",") if p.strip()]
    for proto in supported:
        if proto in offered:
            return proto
    return None


def accept(key: str, subprotocol: str | None = None, extensions: str | None = None,
           headers: dict[str, str] | None = None) -> bytes:
    """The 101 response completing the handshake."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection afterwards."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
             f"Content-Length: {len(body)}", "Connection: close"]
    if body:
        lines.append(f"Content-Type: {content_type}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def reject(exc: HandshakeRejected) -> bytes:
    """The response for a refused request: the status and a one-line reason a person can act on
    (as JSON when the refusal has an error code: an API's client is a program)."""
    if exc.code:
        body = json.dumps({"ok": False, "error": exc.code, "detail": exc.reason}, separators=(",", ":")).encode() + b"\n"
        return response(exc.status, body, "application/json", headers=exc.headers)
    return response(exc.status, (exc.reason + "\n").encode("utf-8"), headers=exc.headers)
