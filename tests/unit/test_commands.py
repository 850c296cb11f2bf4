"""commands: decoding, validation and the error codes of the /ws protocol (no sockets)."""
import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rooms import commands
from gateway.rooms.commands import CommandError

LIMIT = 16


def parse_json(text):
    return commands.parse(commands.decode_json(text.encode() if isinstance(text, str) else text), LIMIT)


def code_of(fn, *args):
    with pytest.raises(CommandError) as info:
        fn(*args)
    return info.value.code, info.value.id


def test_join_leave_publish_refresh():
    c = parse_json('{"op":"join","room":"lobby","id":"a1"}')
    assert (c.op, c.room, c.id) == ("join", "lobby", "a1")
    c = parse_json('{"op":"leave","room":"lobby"}')
    assert (c.op, c.room, c.id) == ("leave", "lobby", None)
    c = parse_json('{"op":"publish","room":"r","data":{"b": [1, 2.5, "x", null]},"id":7}')
    assert c.data == b'{"b":[1,2.5,"x",null]}' and c.id == 7
    c = parse_json('{"op":"refresh","token":"t.t.t"}')
    assert c.token == "t.t.t"
    c = parse_json('{"op":"ping","id":"p"}')
    assert (c.op, c.id) == ("ping", "p")
    assert commands.pong() == {"op": "pong"} and commands.pong(3) == {"op": "pong", "id": 3}


def test_missing_fields_are_all_named_with_a_typo_hint():
    def message(text):
        with pytest.raises(commands.CommandError) as info:
            parse_json(text)
        return info.value.code, info.value.message
    # {"rom": ...} used to be reported only as the missing "data".
    assert message('{"op":"publish","rom":"a"}') == (
        "bad_request", 'publish needs "room" and "data" ("rom" is not a field: did you mean "room"?)')
    assert message('{"op":"publish","rom":"a","data":1}') == (
        "bad_request", 'publish needs "room" ("rom" is not a field: did you mean "room"?)')
    assert message('{"op":"join","name":"a"}') == ("bad_request", 'join needs "room" (unknown field "name")')
    assert message('{"op":"refresh","tokn":"x"}') == (
        "bad_request", 'refresh needs "token" ("tokn" is not a field: did you mean "token"?)')
    assert message('{"opp":"join","room":"a"}')[1].endswith('("opp" is not a field: did you mean "op"?)')
    # Unknown fields next to complete requests are ignored (forward compatible).
    assert parse_json('{"op":"join","room":"a","colour":"red"}').room == "a"


@pytest.mark.parametrize("text, code, rid", [
    ("{", "bad_json", None),
    ("[1,2]", "bad_json", None),
    ('"join"', "bad_json", None),
    ("\xff", "bad_json", None),
    ('{"room":"a"}', "bad_request", None),
    ('{"op":5}', "bad_request", None),
    ('{"op":"dance","id":3}', "unknown_op", 3),
    ('{"op":"join","id":"x"}', "bad_request", "x"),
    ('{"op":"join","room":5,"id":1}', "bad_request", 1),
    ('{"op":"join","room":""}', "bad_room", None),
    ('{"op":"join","room":"a\\nb"}', "bad_room", None),
    ('{"op":"join","room":"a\\u0000"}', "bad_room", None),
    ('{"op":"join","room":"' + "x" * 17 + '"}', "room_name_too_long", None),
    ('{"op":"join","room":"' + "é" * 9 + '"}', "room_name_too_long", None),   # 9 chars, 18 bytes
    ('{"op":"publish","room":"a"}', "bad_request", None),
    ('{"op":"publish","data":1}', "bad_request", None),
    ('{"op":"refresh"}', "bad_request", None),
    ('{"op":"refresh","token":""}', "bad_request", None),
    ('{"op":"join","room":"a","id":true}', "bad_request", None),
    ('{"op":"join","room":"a","id":1.5}', "bad_request", None),
    ('{"op":"join","room":"a","id":"' + "i" * 200 + '"}', "bad_request", None),
    ('{"op":"join","room":"a","id":[1]}', "bad_request", None),
])
def test_bad_requests_have_stable_codes(text, code, rid):
    assert code_of(parse_json, text) == (code, rid)


def test_room_names_at_the_limit_are_fine():
    assert parse_json('{"op":"join","room":"' + "é" * 8 + '"}').room == "é" * 8
    assert parse_json('{"op":"join","room":"a b.c:d/e"}').room == "a b.c:d/e"


def test_msgpack_requests_and_non_json_data():
    obj = commands.decode_msgpack(msgpack.packb({"op": "publish", "room": "r", "data": [1, "x"], "id": 2}))
    assert commands.parse(obj, LIMIT).data == b'[1,"x"]'
    assert code_of(commands.decode_msgpack, b"\xc1") == ("bad_json", None)
    assert code_of(commands.decode_msgpack, msgpack.packb([1])) == ("bad_json", None)
    assert code_of(commands.decode_msgpack, msgpack.packb({"op": "join"}) + b"\x00") == ("bad_json", None)
    raw = commands.decode_msgpack(msgpack.packb({"op": "publish", "room": "r", "data": b"\x00bin", "id": 4}))
    assert code_of(commands.parse, raw, LIMIT) == ("bad_request", 4)
    with pytest.raises(CommandError, match="cannot hold binary .* send binary as base64 text"):
        commands.parse(raw, LIMIT)
    raw = commands.decode_msgpack(msgpack.packb({"op": "publish", "room": "r", "data": {1: 2}}, strict_types=False))
    assert code_of(commands.parse, raw, LIMIT)[0] == "bad_request"


def test_message_payloads_are_built_around_the_serialised_data():
    data = orjson.dumps({"price": 1.25, "sym": "é"})
    payload = commands.json_message("room \"q\"", data, 42)
    assert orjson.loads(payload) == {"op": "message", "room": "room \"q\"", "data": {"price": 1.25, "sym": "é"}, "seq": 42}
    assert payload.startswith(commands.message_prefix("room \"q\"")) and data in payload
    assert msgpack.unpackb(commands.msgpack_message("r", data, 3)) == {
        "op": "message", "room": "r", "data": {"price": 1.25, "sym": "é"}, "seq": 3}


def test_replies():
    assert orjson.loads(commands.encode_json(commands.ack("x", 5))) == {"op": "ack", "id": "x", "seq": 5}
    assert commands.error("bad_json", "nope") == {"op": "error", "code": "bad_json", "message": "nope"}
    assert commands.error("forbidden", "no", 3)["id"] == 3
    assert msgpack.unpackb(commands.encode_msgpack(commands.dropped("r", 4))) == {"op": "dropped", "room": "r", "count": 4}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.text(min_size=1, max_size=LIMIT // 4).filter(str.isprintable), st.integers(0, 1 << 62))
def test_round_trip_any_json_data(value, room, seq):
    """Whatever JSON a client publishes, members get the same value back (JSON and msgpack)."""
    cmd = parse_json(orjson.dumps({"op": "publish", "room": room, "data": value}))
    assert orjson.loads(commands.json_message(room, cmd.data, seq)) == {"op": "message", "room": room, "data": value, "seq": seq}
    assert msgpack.unpackb(commands.msgpack_message(room, cmd.data, seq))["data"] == orjson.loads(cmd.data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_another_exception(blob):
    for decode in (commands.decode_json, commands.decode_msgpack):
        try:
            commands.parse(decode(blob), LIMIT)
        except CommandError as exc:
            assert exc.code in commands.CLIENT_ERRORS
