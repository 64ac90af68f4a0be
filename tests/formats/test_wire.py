"""The ZMQ wire format: round trips over real sockets, and rejection of bad messages."""

import json

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from minard.formats import wire
from minard.testing import free_port


def test_batch_round_trips_records_and_meta():
    records = [b"abc", b"", b"x" * 1000]
    batch = wire.decode(wire.encode("pmt", records, {"producer": "p1", "seq": 7}))
    assert batch.kind == "pmt"
    assert batch.records() == records
    assert batch.meta["seq"] == 7 and batch.meta["count"] == 3
    assert batch.offsets.tolist() == [0, 3, 3]


def test_batch_crosses_a_real_push_pull_socket(zmq_context):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    push, pull = zmq_context.socket(zmq.PUSH), zmq_context.socket(zmq.PULL)
    push.bind(endpoint)
    pull.connect(endpoint)
    records = [bytes([i]) * i for i in range(50)]
    push.send_multipart(wire.encode("cmos", records))
    assert pull.poll(5000)
    batch = wire.decode(pull.recv_multipart())
    assert batch.kind == "cmos" and batch.records() == records


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda f: f[:4], "frame_count"),
        (lambda f: [b"minard/9"] + f[1:], "version"),
        (lambda f: [b"garbage!"] + f[1:], "not_minard"),
        (lambda f: f[:1] + [b"bogus"] + f[2:], "unknown_kind"),
        (lambda f: f[:2] + [b"{not json"] + f[3:], "bad_meta"),
        (lambda f: f[:2] + [b"[1, 2]"] + f[3:], "bad_meta"),
        (lambda f: f[:3] + [f[3][:-1]] + f[4:], "bad_lengths"),
        (lambda f: f[:4] + [f[4] + b"extra"], "bad_lengths"),
    ],
)
def test_malformed_message_is_rejected_with_its_reason(mutate, reason):
    frames = wire.encode("pmt", [b"abcd", b"efgh"])
    with pytest.raises(wire.WireError) as info:
        wire.decode(mutate(frames))
    assert info.value.reason == reason


def test_oversized_payload_is_rejected():
    frames = wire.encode("pmt", [b"x" * 2048])
    with pytest.raises(wire.WireError) as info:
        wire.decode(frames, max_payload=1024)
    assert info.value.reason == "oversize"


def test_meta_is_json_never_code():
    frames = wire.encode("pmt", [b"a"])
    frames[2] = json.dumps({"producer": "__import__('os').system('true')"}).encode()
    assert wire.decode(frames).meta["producer"].startswith("__import__")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=7))
def test_random_frames_raise_only_wire_error(frames):
    try:
        wire.decode(frames)
    except wire.WireError:
        pass
