"""Per-worker results, merging them across processes, and latency percentiles.

Latencies are kept as `array('d')` of seconds: 8 bytes a sample, cheap to append in the
hot path and cheap to pickle from a worker process to the parent.
"""
from array import array
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class WorkerResult:
    """What one worker process measured inside its measurement window."""

    count: int = 0                      # completed operations (echoes, handshakes)
    elapsed: float = 0.0                # seconds the measurement window really lasted
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)   # short reason -> count
    latencies: array = field(default_factory=lambda: array("d"))
    extra: dict = field(default_factory=dict)               # mode-specific counters, summed

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1


@dataclass
class Summary:
    count: int
    rate: float
    errors: int
    error_kinds: dict
    samples: int
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    extra: dict


def merge(results: list) -> Summary:
    """Merge worker results: rates add up (each worker's count over its own window)."""
    count = sum(r.count for r in results)
    rate = sum(r.count / r.elapsed for r in results if r.elapsed > 0)
    errors = sum(r.errors for r in results)
    kinds = Counter()
    extra = Counter()
    lat = array("d")
    for r in results:
        kinds.update(r.error_kinds)
        extra.update(r.extra)
        lat.extend(r.latencies)
    ordered = sorted(lat)
    return Summary(
        count=count,
        rate=rate,
        errors=errors,
        error_kinds=dict(kinds.most_common(10)),
        samples=len(ordered),
        p50_ms=_ms(percentile(ordered, 50)),
        p99_ms=_ms(percentile(ordered, 99)),
        p999_ms=_ms(percentile(ordered, 99.9)),
        max_ms=_ms(ordered[-1] if ordered else None),
        extra={k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()},
    )


def percentile(ordered, pct: float):
    """Nearest-rank percentile of an already sorted sequence (None when empty)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100), at least 1
    return ordered[int(rank) - 1]


def median(values):
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 4)
