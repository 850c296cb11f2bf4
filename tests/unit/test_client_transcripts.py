"""The shared SDK conformance transcripts (tests/sdk/transcripts/*.json, format in its
README.md) replayed against the Python SDK, gateway.client, with a fake network, a fake
clock and a scripted random source (tests/client_fakes.py).

Mapping of the language-neutral transcripts onto the Python SDK:
- options: `<name>_ms` -> `<name>` in seconds; `token` is sent as `?token=` (token_via="query",
  the JS SDK's only way; the Python default is the Authorization header);
- "one write" = one `Transport.send(frames)` call;
- the liveness ping: the Python SDK sends a WebSocket ping (the gateway answers it natively);
  the fake records it as the transcripts' `{"send":[{"op":"ping"}]}`, and a server
  `{"op":"pong"}` frame is simply a frame (activity) to it;
- connection state "closed" (the client stopped or was closed) reads as "disconnected",
  the transcripts' name for it;
- app calls: join -> `await client.join(R, since=, last=, wait=False)` (returns the
  Subscription at once, like JS's client.join), leave -> `await sub.leave()`, publish -> a task
  running `client.publish(...)` whose outcome is the `settle` output.
"""
from __future__ import annotations

import asyncio
import json
import math
import os

import pytest

from gateway.client import Client, ClientState, Disconnected, Joined, Left, Message, Reset
from tests.client_fakes import FakeClock, FakeNetwork, ScriptedRandom, settle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRANSCRIPTS = os.path.join(ROOT, "tests", "sdk", "transcripts")
FILES = sorted(f for f in os.listdir(TRANSCRIPTS) if f.endswith(".json")) if os.path.isdir(TRANSCRIPTS) else []

OPTION_SECONDS = {
    "backoff_initial_ms": "backoff_initial", "backoff_max_ms": "backoff_max",
    "restart_spread_ms": "restart_spread", "long_backoff_ms": "long_backoff",
    "ping_interval_ms": "ping_interval", "liveness_margin_ms": "liveness_margin",
    "command_timeout_ms": "command_timeout", "refresh_margin_ms": "refresh_margin",
}


# -- matching (README "Matching") ------------------------------------------------------------

class Mismatch(AssertionError):
    pass


def _match(expected, actual, captures: dict, exact: bool, path: str = "") -> None:
    if isinstance(expected, str) and expected == "*":
        return
    if isinstance(expected, str) and expected.startswith("$"):
        name = expected[1:]
        if name in captures:
            if captures[name] != actual:
                raise Mismatch(f"{path}: ${name} is {captures[name]!r}, got {actual!r}")
        else:
            captures[name] = actual
        return
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            raise Mismatch(f"{path}: expected an object, got {actual!r}")
        if exact and set(expected) != set(actual):
            raise Mismatch(f"{path}: keys {sorted(actual)} != expected {sorted(expected)}")
        for key, value in expected.items():
            if key not in actual:
                raise Mismatch(f"{path}.{key}: missing in {actual!r}")
            _match(value, actual[key], captures, exact, f"{path}.{key}")
        return
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            raise Mismatch(f"{path}: expected {expected!r}, got {actual!r}")
        for i, (e, a) in enumerate(zip(expected, actual)):
            _match(e, a, captures, exact, f"{path}[{i}]")
        return
    if type(expected) is not type(actual) and not (isinstance(expected, (int, float)) and isinstance(actual, (int, float))
                                                   and not isinstance(actual, bool) and not isinstance(expected, bool)):
        raise Mismatch(f"{path}: expected {expected!r}, got {actual!r}")
    if expected != actual:
        raise Mismatch(f"{path}: expected {expected!r}, got {actual!r}")


def match_output(expected: dict, actual: dict, captures: dict) -> None:
    """Frames exactly, event data and settle errors as a subset."""
    trial = dict(captures)
    if set(expected) - {"data"} != set(actual) - {"data"}:
        raise Mismatch(f"expected {expected!r}, got {actual!r}")
    for key, value in expected.items():
        if key == "send":
            _match(value, actual["send"], trial, exact=True, path="send")
        elif key in ("data", "error"):
            _match(value, actual.get(key), trial, exact=False, path=key)
        else:
            _match(value, actual[key], trial, exact=True, path=key)
    captures.update(trial)


def substitute(value, captures: dict):
    if isinstance(value, str) and value.startswith("$"):
        if value[1:] not in captures:
            raise AssertionError(f"{value} is not captured yet")
        return captures[value[1:]]
    if isinstance(value, dict):
        return {k: substitute(v, captures) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, captures) for v in value]
    return value


# -- events as transcript outputs ----------------------------------------------------------------

def event_data(value) -> dict:
    if isinstance(value, Message):
        return {"data": value.data, "seq": value.seq, "epoch": value.epoch, "room": value.room}
    if isinstance(value, Joined):
        return {"recovered": value.recovered, "seq": value.seq, "epoch": value.epoch}
    if isinstance(value, Reset):
        return {"epoch": value.epoch, "seq": value.seq, "reason": value.reason}
    if isinstance(value, Left):
        return {"reason": value.reason}
    if isinstance(value, Disconnected):
        return {"code": value.code, "reason": value.reason, "reconnect": value.reconnect, "status": value.status}
    if isinstance(value, BaseException):
        return {"code": getattr(value, "code", None), "message": str(value)}
    return {}


class Runner:
    def __init__(self, script: dict) -> None:
        self.script = script
        self.clock = FakeClock(script.get("start", 1_700_000_000_000))
        self.network = FakeNetwork()
        self.random = ScriptedRandom(script.get("random", [0.5]))
        self.captures: dict = {}
        self.subs: dict = {}
        self.tasks: dict = {}
        self.tokens = list(script.get("tokens", []))
        options = dict(script.get("options", {}))
        kwargs = {}
        for key, value in options.items():
            if key in OPTION_SECONDS:
                kwargs[OPTION_SECONDS[key]] = value / 1000
            elif key == "token":
                kwargs["token"] = value
            elif key == "get_token":
                if value:
                    kwargs["get_token"] = self.get_token
            else:
                raise AssertionError(f"unknown transcript option {key!r}")
        self.client = Client(script["url"], token_via="query", connect=self.network.connect, clock=self.clock,
                             random=self.random, **kwargs)
        for name in ("connected", "disconnected", "error"):
            self.client.on(name, self._recorder(name))

    @property
    def outputs(self) -> list:
        return self.network.outputs

    async def get_token(self) -> str:
        self.outputs.append({"get_token": True})
        if not self.tokens:
            raise AssertionError("getToken called more often than the transcript has tokens")
        token = self.tokens.pop(0)
        if isinstance(token, dict):
            raise RuntimeError(token.get("error", "get_token failed"))
        return token

    def _recorder(self, name: str, room: str | None = None):
        def record(value) -> None:
            out = {"event": name}
            if room is not None:
                out["room"] = room
            out["data"] = event_data(value)
            self.outputs.append(out)
        return record

    def _settled(self, label: str, task: asyncio.Task) -> None:
        if task.cancelled():
            self.outputs.append({"settle": label, "error": {"code": "cancelled"}})
        elif task.exception() is not None:
            self.outputs.append({"settle": label, "error": event_data(task.exception())})
        else:
            self.outputs.append({"settle": label, "value": task.result()})

    # -- steps --------------------------------------------------------------------------------

    async def run(self) -> None:
        self.client.start()
        await settle()
        for index, step in enumerate(self.script["steps"]):
            try:
                await self.step(step)
            except AssertionError as exc:
                raise AssertionError(f"{self.script['name']} step {index} {json.dumps(step)}: {exc}\n"
                                     f"outputs: {json.dumps(self.outputs)}") from None
        await self.client.close()

    async def step(self, step: dict) -> None:
        if "app" in step:
            await self.app(step)
        elif "server" in step:
            await self.server(step)
        elif "advance" in step:
            target = self.clock.now_ms + step["advance"]
            while self.clock.fire_next(target):
                await settle()
            self.clock.now_ms = target
            await settle()
        elif "expect" in step:
            expected = step["expect"]
            actual, self.network.outputs[:] = list(self.outputs), []
            if len(actual) != len(expected):
                raise AssertionError(f"expected {len(expected)} outputs {json.dumps(expected)}, got {json.dumps(actual)}")
            for e, a in zip(expected, actual):
                try:
                    match_output(e, a, self.captures)
                except Mismatch as exc:
                    raise AssertionError(f"expected {json.dumps(e)}, got {json.dumps(a)}: {exc}") from None
        elif "await" in step:
            await self.await_output(step["await"], step["within"])
        elif "check" in step:
            self.check(step)
        else:
            raise AssertionError(f"unknown step {step!r}")

    async def app(self, step: dict) -> None:
        action = step["app"]
        if action == "join":
            room = step["room"]
            sub = await self.client.join(room, since=step.get("since"), last=step.get("last", False), wait=False)
            if room not in self.subs or self.subs[room] is not sub:
                for name in ("message", "joined", "reset", "left", "error"):
                    sub.on(name, self._recorder(name, room))
                self.subs[room] = sub
        elif action == "leave":
            await self.subs[step["room"]].leave()
        elif action == "publish":
            kwargs = {"idempotency_key": step["key"]} if "key" in step else {}
            task = asyncio.ensure_future(self.client.publish(step["room"], step["data"], **kwargs))
            label = step.get("as", f"publish{len(self.tasks)}")
            self.tasks[label] = task
            task.add_done_callback(lambda t, label=label: self._settled(label, t))
        elif action == "close":
            self.tasks["__close"] = asyncio.ensure_future(self.client.close())
        elif action == "set_position":
            self.subs[step["room"]].position = step["position"]
        else:
            raise AssertionError(f"unknown app action {action!r}")
        await settle()

    async def server(self, step: dict) -> None:
        action = step["server"]
        sock = self.network.newest
        if action == "accept":
            sock.accept()
        elif action == "refuse":
            sock.refuse(step["status"])
        elif action == "unreachable":
            sock.unreachable()
        elif action == "send":
            for frame in step["frames"]:
                sock.deliver(json.dumps(substitute(frame, self.captures)))
                await settle()     # one WebSocket message per event-loop turn, as in a browser
        elif action == "close":
            sock.server_close(step["code"], step.get("reason", ""))
        elif action == "drop":
            sock.drop()
        else:
            raise AssertionError(f"unknown server action {action!r}")
        await settle()

    async def await_output(self, expected: dict, within: list) -> None:
        if self.outputs:
            raise AssertionError(f"outputs pending before await: {json.dumps(self.outputs)}")
        lo, hi = within
        start = self.clock.now_ms
        while not self.outputs:
            if not self.clock.fire_next(start + hi):
                raise AssertionError(f"no output within {hi} ms (next timer at "
                                     f"{None if self.clock.next_due() is None else self.clock.next_due() - start} ms)")
            await settle()
        elapsed = self.clock.now_ms - start
        first = self.outputs.pop(0)
        try:
            match_output(expected, first, self.captures)
        except Mismatch as exc:
            raise AssertionError(f"awaited {json.dumps(expected)}, got {json.dumps(first)}: {exc}") from None
        if not (lo - 1e-6 <= elapsed <= hi + 1e-6):
            raise AssertionError(f"{json.dumps(expected)} came after {elapsed} ms, not within [{lo}, {hi}]")

    def check(self, step: dict) -> None:
        what = step["check"]
        if what == "position":
            pos = self.subs[step["room"]].position
            actual = None if pos is None else pos.to_json()
            if actual != step["position"]:
                raise AssertionError(f"position {actual} != {step['position']}")
        elif what == "state":
            state = self.client.state
            name = "disconnected" if state is ClientState.CLOSED else state.value
            if name != step["value"]:
                raise AssertionError(f"state {name} != {step['value']}")
        else:
            raise AssertionError(f"unknown check {what!r}")


def load(name: str) -> dict:
    with open(os.path.join(TRANSCRIPTS, name)) as fh:
        return json.load(fh)


@pytest.mark.skipif(not FILES, reason="no transcripts in tests/sdk/transcripts")
@pytest.mark.parametrize("name", FILES)
def test_transcript(name):
    asyncio.run(Runner(load(name)).run())


def test_every_transcript_is_well_formed():
    """Names match files, every step is of a known kind: a malformed file fails loudly here."""
    kinds = {"app", "server", "advance", "expect", "await", "check"}
    assert FILES, "the transcripts are missing"
    for name in FILES:
        script = load(name)
        assert script["name"] + ".json" == name
        assert script["description"]
        for step in script["steps"]:
            assert len(kinds & set(step)) == 1, (name, step)
        assert not math.isnan(script.get("start", 0))


def test_the_runner_fails_a_wrong_expectation():
    """The runner is not vacuous: a transcript whose expected delay or frame is off fails."""
    script = load("close-4000-recovers.json")
    for step in script["steps"]:
        if "await" in step:
            step["within"] = [49, 49]
            break
    with pytest.raises(AssertionError, match="within"):
        asyncio.run(Runner(script).run())
    script = load("gap-recovers-in-order.json")
    for step in script["steps"]:
        for out in step.get("expect", []):
            for frame in out.get("send", []):
                if "since" in frame:
                    frame["since"]["seq"] = 5
    with pytest.raises(AssertionError, match="since"):
        asyncio.run(Runner(script).run())
