"""The one exception the frame layer raises.

Leaf module: imports only the standard library.
"""


class FrameError(Exception):
    """The peer broke RFC 6455 at the frame level; close the connection with `code`.

    `code` is a close code (1002 protocol error, 1007 invalid data, 1009 too big) and
    `reason` a short human sentence that fits in a close frame (<= 123 bytes UTF-8).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FrameError) and (self.code, self.reason) == (other.code, other.reason)

    def __hash__(self) -> int:
        return hash((self.code, self.reason))
