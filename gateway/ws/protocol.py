"""Sans-I/O WebSocket server protocol: bytes in, messages out; frames to send accumulate.

    receive_data(bytes) -> [ (opcode, payload), ... ]   complete text/binary messages
    send(opcode, payload) / send_frame(frame_bytes)     queue outgoing frames (corked)
    data_to_send() -> [bytes, ...]                      everything queued, in order
    close(code, reason)                                 start the closing handshake

The state machine itself lives in gateway_ext as a pair of twins (`_protocol_py`, the
reference, and `_protocol_c`, compiled), because its loop runs per frame and its send per
message: on the 1-in-flight echo benchmark those Python frames were most of the gateway's
user-space time per message (benchmarks/README.md). Read `gateway_ext/_protocol_py.py` for
the theory of operation and the RFC 6455 / RFC 7692 rules it enforces. This module is the
name the rest of `gateway` imports it by; gateway_ext picks the twin
(WS_GATEWAY_PURE_PYTHON forces the reference one).

permessage-deflate: pass the connection's codec (gateway/ws/deflate.py) as `deflate`.
"""
from gateway_ext import ServerProtocol, State, encode_close_payload

__all__ = ["ServerProtocol", "State", "encode_close_payload"]
