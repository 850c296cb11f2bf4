"""History in the hub: per-room retention from the config, and the replay window that serves
recoveries without asking the broker once per joiner.

Retention. `RetentionTable.for_room(name)` answers the broker's `retention(room)`: the first
`[[rooms.policy]]` rule whose pattern matches (fnmatch, case-sensitive, like the
slow-consumer policy) with its own `history_size` / `history_ttl`, the global
`history_size` / `history_ttl` for what a rule does not set or when none matches.

Replay window (`Window`). The publications a room's recoveries need, contiguous in seq:
`entries` hold seq floor+1 .. last. It is filled by one broker history read and then
extended by every publication the hub fans out, trimmed to the room's history size (+ WINDOW_SLACK), so
while it lives every joiner whose position is in [floor, top] is served from memory: N
joiners of a room cost one read per process, however they arrive. Each entry keeps the
frames made from it, one per encoding (JSON, msgpack, compressed per window size), built
at most once and shared by every joiner, like a live fan-out. A window nobody recovered
from for `WINDOW_IDLE` seconds is dropped (the hub's idle rooms pay nothing), and the
windows of all rooms together are capped (`max_window_bytes`).

Pure data and policy: imports the standard library and `broker.base` (Retention). No
transports, no Redis.
"""
from __future__ import annotations

import fnmatch

from gateway.broker.base import Retention

WINDOW_IDLE = 30.0          # seconds a window lives without a recovery served from it
ENTRY_OVERHEAD = 150        # bytes per window entry besides its payload and frames
# A window keeps up to history_size + this many entries: Redis trims streams by whole nodes
# (MAXLEN ~, up to 100 more than asked), and what a read brought must not be cut before the
# joiners it was made for are answered.
WINDOW_SLACK = 200


class RetentionTable:
    """Room name -> Retention, from the global settings and the `[[rooms.policy]]` rules."""

    def __init__(self, default: Retention, rules: list[tuple[str, Retention]] | None = None) -> None:
        self.default = default
        self.rules = list(rules or ())

    def for_room(self, room: str) -> Retention:
        for pattern, retention in self.rules:
            if fnmatch.fnmatchcase(room, pattern):
                return retention
        return self.default

    @classmethod
    def from_config(cls, config) -> "RetentionTable":
        default = Retention(config.history_size, config.history_ttl)
        rules = []
        for rule in config.room_policies:      # config.RoomPolicy, already validated
            rules.append((rule.pattern, Retention(default.size if rule.history_size is None else rule.history_size,
                                                  default.ttl if rule.history_ttl is None else rule.history_ttl)))
        return cls(default, rules)


class Entry:
    """One publication in a window and the frames made from it (built lazily, shared)."""

    __slots__ = ("seq", "data", "frames", "size")

    def __init__(self, seq: int, data: bytes, json_frame: bytes | None = None) -> None:
        self.seq = seq
        self.data = data
        # variant -> frame: "json", "msgpack", or a permessage-deflate window size (int).
        self.frames: dict = {} if json_frame is None else {"json": json_frame}
        self.size = ENTRY_OVERHEAD + 2 * len(data)


class Window:
    """A room's contiguous recent publications: entries hold seq floor+1 .. last."""

    __slots__ = ("epoch", "floor", "entries", "bytes", "used", "batches")

    def __init__(self, epoch: str, floor: int, now: float) -> None:
        self.epoch = epoch
        self.floor = floor            # recoveries from a position >= floor can be served
        self.entries: list[Entry] = []
        self.bytes = 0
        self.used = now               # last time a recovery was served from it
        self.batches: dict = {}       # (variant, since, until) -> (frames, batch): shared by joiners

    @property
    def last(self) -> int:
        return self.entries[-1].seq if self.entries else self.floor

    def append(self, entry: Entry) -> bool:
        """Add the next publication; False (and nothing added) if it would leave a hole."""
        if entry.seq != self.last + 1:
            return entry.seq <= self.last   # an old one: already here, fine; a gap: not contiguous
        self.entries.append(entry)
        self.bytes += entry.size
        if self.batches:
            self.batches = {}
        return True

    def trim(self, size: int) -> int:
        """Keep at most `size` entries (the newest); returns the bytes freed."""
        extra = len(self.entries) - size
        if extra <= 0:
            return 0
        gone = self.entries[:extra]
        del self.entries[:extra]
        freed = sum(e.size for e in gone)
        self.bytes -= freed
        self.floor = gone[-1].seq
        self.batches = {}
        return freed

    def covers(self, since: int, until: int) -> bool:
        """Can it replay every publication in (since, until]?"""
        return self.floor <= since and until <= self.last

    def between(self, since: int, until: int) -> list[Entry]:
        """The entries with since < seq <= until (requires covers(since, until))."""
        first = self.entries[0].seq if self.entries else self.floor + 1
        return self.entries[since + 1 - first:until + 1 - first]


class HistoryStats:
    """Counters exported as ws_gateway_history_* (plain ints, read at scrape time)."""

    __slots__ = ("reads", "read_failures", "recoveries_succeeded", "recoveries_failed", "replayed",
                 "window_bytes", "bytes", "broker", "resets", "last_joins", "gauges")

    def __init__(self, broker=None) -> None:
        self.reads = 0                  # history reads this process made from the broker
        self.read_failures = 0
        self.recoveries_succeeded = 0   # joins with `since` answered recovered: true
        self.recoveries_failed = 0      # ... answered recovered: false (too old, other epoch)
        self.replayed = 0               # publications replayed to joiners (frames handed to members)
        self.resets = 0                 # `reset` ops: a room's numbering restarted under its members
        self.last_joins = 0             # joins with `last: true`
        self.window_bytes = 0           # replay windows held by the hub
        self.bytes = 0                  # history bytes held by this process (refreshed by `stats`)
        self.broker = broker
        self.gauges = ("window_bytes", "bytes")

    @property
    def stats(self) -> "HistoryStats":
        """For metrics (read at scrape time): the hub's windows plus the memory broker's logs."""
        self.bytes = self.window_bytes + getattr(self.broker, "history_bytes", 0)
        return self
