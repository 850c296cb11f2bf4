"""OutboundQueue and the slow-consumer policies, without sockets."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config as config_mod
from gateway.rooms.backpressure import (
    DISCONNECT, DROP_NEWEST, DROP_OLDEST, LATEST, BackpressureStats, OutboundQueue, PolicyTable,
    SlowConsumerPolicy,
)
from gateway.errors import ConfigError


def frame(room, n, size=10):
    body = f"{room}:{n}:".encode()
    return body + b"x" * (size - len(body))


def drain(q):
    out = []
    while q:
        out.extend(q.pop(25))
    return out


def test_queue_keeps_order_and_counts_bytes():
    q = OutboundQueue(1000)
    p = SlowConsumerPolicy(DISCONNECT, 1000)
    frames = [frame("a", i) for i in range(5)] + [frame("b", i) for i in range(3)]
    for f in frames:
        assert q.push(f[:1].decode(), f, p)
    assert q.bytes == 80 and len(q) == 8
    assert q.pop(25) == frames[:3]      # up to about 25 bytes: whole frames, at least 25
    assert drain(q) == frames[3:]
    assert q.bytes == 0 and not q


def test_disconnect_refuses_when_full_and_counts():
    stats = BackpressureStats()
    p = SlowConsumerPolicy(DISCONNECT, 30)
    q = OutboundQueue(30, stats)
    assert all(q.push("a", frame("a", i), p) for i in range(3))
    assert q.push("a", frame("a", 3), p) is False
    assert stats.slow_disconnects == 1 and p.slow_disconnects == 1 and stats.dropped == 0
    assert stats.queues_opened == 1


def test_drop_newest_keeps_the_oldest():
    stats = BackpressureStats()
    p = SlowConsumerPolicy(DROP_NEWEST, 30)
    q = OutboundQueue(30, stats)
    for i in range(10):
        assert q.push("a", frame("a", i), p)
    assert drain(q) == [frame("a", i) for i in range(3)]
    assert q.take_drops() == [("a", 7)]
    assert stats.dropped_newest == 7 and p.dropped == 7
    assert q.take_drops() == []


def test_drop_oldest_keeps_the_newest():
    stats = BackpressureStats()
    p = SlowConsumerPolicy(DROP_OLDEST, 30)
    q = OutboundQueue(30, stats)
    for i in range(10):
        assert q.push("a", frame("a", i), p)
    assert drain(q) == [frame("a", i) for i in range(7, 10)]
    assert q.take_drops() == [("a", 7)]
    assert stats.dropped_oldest == 7 and p.dropped == 7


def test_latest_keeps_only_the_last_per_room_in_order():
    stats = BackpressureStats()
    p = SlowConsumerPolicy(LATEST, 1000)
    q = OutboundQueue(1000, stats)
    for i in range(5):
        q.push("a", frame("a", i), p)
        q.push("b", frame("b", i), p)
    # a4 was queued before b4: the global order of the survivors is kept.
    assert drain(q) == [frame("a", 4), frame("b", 4)]
    assert sorted(q.take_drops()) == [("a", 4), ("b", 4)]
    assert stats.dropped_latest == 8


def test_drop_policy_never_evicts_another_rooms_frames():
    stats = BackpressureStats()
    keep = SlowConsumerPolicy(DISCONNECT, 1000)
    oldest = SlowConsumerPolicy(DROP_OLDEST, 1000, "t*")
    q = OutboundQueue(30, stats)
    assert q.push("a", frame("a", 0), keep) and q.push("a", frame("a", 1), keep) and q.push("a", frame("a", 2), keep)
    assert q.push("t", frame("t", 0), oldest)   # full of room a: the new frame is dropped
    assert drain(q) == [frame("a", i) for i in range(3)]
    assert q.take_drops() == [("t", 1)]


def test_per_room_limit_bounds_the_rooms_share():
    p = SlowConsumerPolicy(DROP_OLDEST, 20, "small")
    big = SlowConsumerPolicy(DROP_NEWEST, 1000)
    q = OutboundQueue(1000)
    for i in range(5):
        q.push("small", frame("s", i), p)
        q.push("big", frame("b", i), big)
    assert drain(q) == [frame("b", i) for i in range(3)] + [frame("s", 3), frame("b", 3), frame("s", 4), frame("b", 4)]


def test_frame_larger_than_the_limit_is_dropped():
    q = OutboundQueue(30)
    p = SlowConsumerPolicy(DROP_OLDEST, 30)
    q.push("a", frame("a", 0), p)
    assert q.push("a", frame("a", 1, size=50), p)
    assert not q and q.take_drops() == [("a", 2)]


def test_tombstones_are_compacted():
    q = OutboundQueue(1 << 20)
    keep = SlowConsumerPolicy(DISCONNECT, 1 << 20)
    latest = SlowConsumerPolicy(LATEST, 1 << 20)
    q.push("a", frame("a", 0), keep)
    for i in range(10_000):
        q.push("t", frame("t", i), latest)
    assert len(q._order) < 200          # not 10,001: conflated entries do not accumulate
    assert drain(q) == [frame("a", 0), frame("t", 9999)]


def test_policy_table_first_match_wins_and_caps_limits():
    cfg = config_mod.load(None, env={}, overrides={"max_queue_bytes": 1000, "slow_consumer_policy": "drop_oldest"})
    cfg = cfg.replace(room_policies=(
        config_mod.RoomPolicy("cursor.*", "latest", 100),
        config_mod.RoomPolicy("cursor.*", "disconnect"),
        config_mod.RoomPolicy("big.*", "drop_newest", 10**9),
    ))
    table = PolicyTable.from_config(cfg)
    assert (table.for_room("cursor.1").name, table.for_room("cursor.1").max_queue_bytes) == (LATEST, 100)
    assert table.for_room("big.x").max_queue_bytes == 1000
    assert table.for_room("other").name == DROP_OLDEST
    assert len(table.all()) == 4


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        SlowConsumerPolicy("drop_everything")


@pytest.mark.parametrize("body, needle", [
    ('slow_consumer_policy = "nope"', "slow_consumer_policy"),
    ("max_queue_bytes = 0", "max_queue_bytes"),
    ('[[rooms.policy]]\npolicy = "latest"', "pattern"),
    ('[[rooms.policy]]\npattern = "a*"\npolicy = "sometimes"', "policy"),
    ('[[rooms.policy]]\npattern = "a*"\npolicy = "latest"\nmax_queue_bytes = -1', "max_queue_bytes"),
    ('[[rooms.policy]]\npattern = "a*"\ncolour = "red"', "colour"),
    ('rooms = { policy = "latest" }', "rooms.policy"),
    ('[[rooms.policy]]\npattern = "a*"\npolicy = "latst"', "did you mean 'latest'"),
    ('[[rooms.policy]]\npattern = "a*"\nmax_queue_bytes = "big"', "max_queue_bytes: expected an integer"),
    ('[[rooms.policy]]\npattern = "a*"\npolicyy = "latest"', "did you mean 'policy'"),
    ('[room.policy]\npattern = "a*"', "unknown table \\[room\\] \\(did you mean 'rooms'"),
    ('[rooms.policy]\npattern = "a*"', r"write \[\[rooms.policy\]\]"),
    ('[rooms]\npolicies = []', "did you mean 'policy'"),
])
def test_bad_policy_config_is_a_clear_error(tmp_path, body, needle):
    path = tmp_path / "gw.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError, match=needle):
        config_mod.load(str(path), env={})


ops = st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 40), st.booleans()), max_size=200)


@settings(max_examples=200, deadline=None)
@given(ops, st.sampled_from([DROP_OLDEST, DROP_NEWEST, LATEST]), st.integers(1, 120))
def test_invariants_under_random_load(seq, policy_name, limit):
    """Bytes never exceed the limit, accounting is exact, per-room order is kept, and
    every pushed frame is either delivered or counted as dropped exactly once."""
    stats = BackpressureStats()
    policy = SlowConsumerPolicy(policy_name, limit)
    q = OutboundQueue(limit, stats)
    pushed = {r: [] for r in "abc"}
    got = []
    for i, (room, size, pop) in enumerate(seq):
        f = f"{room}{i:04d}".encode().ljust(size, b".")[:max(size, 5)]
        q.push(room, f, policy)
        pushed[room].append(f)
        assert q.bytes <= limit
        if pop:
            got.extend(q.pop(size))
        live = [e[0] for e in q._order if e[0] is not None]
        assert q.bytes == sum(map(len, live)) and len(q) == len(live)
    got.extend(drain(q))
    drops = dict(q.take_drops())
    for room in "abc":
        mine = [f for f in got if f[:1] == room.encode()]
        it = iter(pushed[room])
        assert all(f in it for f in mine)          # a subsequence: order kept
        assert len(mine) + drops.get(room, 0) == len(pushed[room])
    assert stats.dropped == sum(drops.values()) == policy.dropped
    if policy_name == LATEST:
        assert stats.dropped_newest + stats.dropped_oldest + stats.dropped_latest == stats.dropped
