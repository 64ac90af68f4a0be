"""The challenge-response arithmetic of the dispatcher handshake (pure)."""

from __future__ import annotations

import pytest

from minard.formats import handshake

SECRET = "mnd_" + "s" * 43
HELLO = "analyzer:minard_dispatch_push:batch"


def exchange(secret=SECRET, hello=HELLO, record=None):
    record = record or handshake.make_record(SECRET)
    nonce = handshake.new_nonce()
    response, expected = handshake.respond(secret, hello, handshake.challenge(nonce, record))
    return record, nonce, response, expected


def test_the_right_secret_is_accepted_and_both_sides_agree_on_the_server_signature():
    record, nonce, response, expected = exchange()
    assert handshake.verify(record, HELLO, nonce, response) == expected


def test_a_wrong_secret_is_refused():
    record, nonce, response, _ = exchange(secret=SECRET + "x")
    assert handshake.verify(record, HELLO, nonce, response) is None


def test_a_response_replayed_against_another_nonce_or_hello_is_refused():
    record, nonce, response, _ = exchange()
    assert handshake.verify(record, HELLO, handshake.new_nonce(), response) is None
    assert handshake.verify(record, "control:minard_dispatch_push", nonce, response) is None


def test_the_stored_record_holds_neither_the_secret_nor_the_client_key():
    record = handshake.make_record(SECRET)
    salt = bytes.fromhex(record["salt"])
    ckey = handshake.client_key(SECRET, salt, record["n"], record["r"], record["p"])
    text = repr(record)
    assert SECRET not in text and ckey.hex() not in text


@pytest.mark.parametrize("bad", ["", "x:y", "ab:" + "0" * 64, "0" * 32 + ":" + "z" * 64, "0" * 32 + ":" + "0" * 62])
def test_a_malformed_response_is_refused_not_raised(bad):
    record = handshake.make_record(SECRET)
    assert handshake.verify(record, HELLO, handshake.new_nonce(), bad) is None


@pytest.mark.parametrize("challenge", [
    "md5:00:00:1024:8:1", "scrypt-sha256:zz:00:1024:8:1", "scrypt-sha256:00:00:1000:8:1",
    "scrypt-sha256:00:00:1073741824:8:1", "scrypt-sha256:00:00:1024:99:1", "scrypt-sha256:00"])
def test_a_client_refuses_a_malformed_or_ruinous_challenge(challenge):
    with pytest.raises(handshake.HandshakeError):
        handshake.respond(SECRET, HELLO, challenge)


def test_the_worked_example_of_docs_protocol_md_is_what_the_code_computes():
    record = handshake.make_record("mnd_example-token-do-not-use", salt=bytes(range(16)),
                                   params={"n": 1024, "r": 8, "p": 1})
    hello, snonce = "analyzer:minard_dispatch_push:batch", "00112233445566778899aabbccddeeff"
    challenge = handshake.challenge(snonce, record)
    assert challenge == ("scrypt-sha256:00112233445566778899aabbccddeeff:"
                         "000102030405060708090a0b0c0d0e0f:1024:8:1")
    assert record["stored_key"] == "110543ea23cc5dc679bf6e4cd5a85b0b628bbf2375dbdb287cb2a496fa4f0358"
    assert record["server_key"] == "369f2c42084aa22b7d2f04679efb05d6270db5f1ab11107e4ea11c053e6907f7"
    response = ("ffeeddccbbaa99887766554433221100:"
                "22023b77ffa12a08b47d9bd4ffad62bce57ab2cc550fd748799ae8a390277846")
    signature = handshake.verify(record, hello, snonce, response)
    assert signature.hex() == "fc5d4454dff07c5ce48e12f5e5ba03f4cbe067e87940aa2b51e468813e515dfd"
