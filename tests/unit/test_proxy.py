"""Proxy hook pieces without a network: the circuit breaker's states and the connect answer."""
import pytest

from gateway.api.hookclient import CircuitBreaker
from gateway.api.proxy import RoomHook, principal_from_answer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_breaker_opens_after_n_failures_in_a_row_and_probes_once_after_reset():
    clock = Clock()
    breaker = CircuitBreaker(3, 5.0, clock)
    assert breaker.allow()
    assert not breaker.failure() and not breaker.failure()
    breaker.success()                         # a success resets the run
    assert not breaker.failure() and not breaker.failure()
    assert breaker.failure() and breaker.open  # third in a row
    assert not breaker.allow()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()                     # the probe
    assert not breaker.allow()                 # only one probe at a time
    assert breaker.failure()                   # the probe failed: open again, for another reset
    assert not breaker.allow()
    clock.now += 5.1
    assert breaker.allow()
    breaker.success()
    assert not breaker.open and breaker.allow() and breaker.allow()


def test_connect_answer_becomes_a_principal():
    p = principal_from_answer({"user": "alice", "rooms": ["chat.*"], "info": {"n": 1}, "expire_at": 2e9},
                              ("*",), ("*",))
    assert p.user == "alice" and p.can_join("chat.1") and not p.can_join("news")
    assert p.can_publish("chat.1") and not p.can_publish("x")     # publish defaults to the rooms given
    assert p.claims["info"] == {"n": 1} and p.expires_at == 2e9
    anonymous = principal_from_answer({"user": ""}, ("lobby",), ("*",))
    assert anonymous.user == "" and anonymous.can_join("lobby") and anonymous.can_publish("any")


@pytest.mark.parametrize("answer", [[], {"rooms": ["x"]}, {"user": 5}, {"user": "a\nb"}, {"user": "a", "rooms": 3},
                                    {"user": "a", "expire_at": "soon"}, {"user": "a", "info": "x" * 5000}])
def test_invalid_connect_answers_are_refused(answer):
    with pytest.raises(ValueError):
        principal_from_answer(answer, ("*",), ("*",))


def test_room_hook_applies_to_its_patterns_only():
    hook = RoomHook("join", client=None, patterns=("chat.*", "dm.?"), node="n", stats=None)
    assert hook.applies("chat.1") and hook.applies("dm.a")
    assert not hook.applies("news") and not hook.applies("dm.ab")
