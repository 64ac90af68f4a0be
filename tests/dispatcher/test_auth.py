"""Dispatcher authentication, role grants and connection limits, against a real process.

Every connection must prove a program key (HELLO + AUTH challenge-response,
docs/protocol.md section 2.1) before anything it sends is acted upon.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from minard.dispatcher.client import (
    CommandFailed,
    ConnectionClosed,
    Credential,
    DispatchClient,
    issue_credentials,
)
from minard.formats import framing, handshake
from minard.ops.keys import KeyStore
from minard.testing import wait_for

pytestmark = pytest.mark.timeout(120)

ROLES = ("source", "analyzer", "writer", "control")


def raw_frames(port: int, data: bytes, timeout: float = 10.0) -> list:
    """Send *data* on a fresh socket; every frame the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock, timeout)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> list:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return framing.decode_all(b"".join(chunks))
        chunks.append(data)


def stats(proc) -> dict:
    with DispatchClient.connect(proc.address, "control", timeout=5.0) as control:
        return control.stats()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


# --------------------------------------------------------------------------
# Who may connect
# --------------------------------------------------------------------------

def test_unauthenticated_exit_is_refused_with_one_error_and_the_dispatcher_lives(disp):
    frames = raw_frames(disp.port, framing.command_frame("EXIT"))
    assert [f.text for f in frames] == [
        "ERROR:AUTH: authenticate first: HELLO role:program, then AUTH"]
    assert disp.proc.poll() is None
    frames = raw_frames(disp.port, framing.encode_frame("HELLO", "control:control")
                        + framing.command_frame("EXIT"))
    # A command instead of the AUTH response: refused, one error, closed.
    assert len(frames) == 2 and frames[0].tag == "AUTH"
    assert frames[1].text == "ERROR:AUTH: authenticate first: HELLO role:program, then AUTH"
    assert disp.proc.poll() is None
    s = stats(disp)
    assert s["auth_failures"] == 2 and s["state"] == "NoTape"


def test_an_authenticated_control_client_can_still_exit_the_dispatcher(disp):
    with DispatchClient.connect(disp.address, "control", timeout=5.0) as control:
        assert control.command("EXIT") == "OK:EXIT"
    assert disp.wait(10) == 0


def test_without_a_key_an_analyzer_cannot_connect_nor_stall_the_end_of_a_run(disp, tmp_path):
    no_keys = {"dispatcher_credentials_file": str(tmp_path / "none.json")}
    with pytest.raises(CommandFailed, match="wants a key for role analyzer"):
        DispatchClient.connect(disp.address, "analyzer", cfg=no_keys, timeout=5.0)
    # A raw analyzer that says HELLO and never answers: not an analyzer, so the run
    # end does not wait the 5 s FINISHED timeout for it.
    silent = socket.create_connection(("127.0.0.1", disp.port), timeout=5)
    try:
        silent.sendall(framing.encode_frame("HELLO", "analyzer:minard_dispatch_push"))
        with DispatchClient.connect(disp.address, "source", timeout=5.0) as source:
            assert source.command("ANALYZERS?") == "ANALYZERS:\nEND"
            assert source.command("BEGINTAPE:7:1") == "OK:BEGINTAPE"
            t0 = time.monotonic()
            assert source.command("ENDTAPE") == "OK:ENDTAPE"
            source.wait_command("ALLFINISHED", timeout=4.0)
            assert time.monotonic() - t0 < 2.0
    finally:
        silent.close()
    assert stats(disp)["finished_timeouts"] == 0


def test_a_wrong_key_is_refused_and_counted(disp):
    wrong = Credential("minard_dispatch_push", "mnd_" + "x" * 43)
    with pytest.raises(CommandFailed, match="ERROR:AUTH: authentication failed"):
        DispatchClient.connect(disp.address, "analyzer", credential=wrong, timeout=5.0)
    unknown = Credential("nobody", "mnd_" + "y" * 43)
    with pytest.raises(CommandFailed, match="ERROR:AUTH: authentication failed"):
        DispatchClient.connect(disp.address, "analyzer", credential=unknown, timeout=5.0)
    assert stats(disp)["auth_failures"] == 2


def test_a_valid_key_of_a_program_not_granted_the_role_is_refused(disp, dispatcher_credentials):
    creds = json.loads(dispatcher_credentials[1].read_text())
    control_key = Credential(creds["control"]["name"], creds["control"]["token"])
    with pytest.raises(CommandFailed, match="program control may not connect as source"):
        DispatchClient.connect(disp.address, "source", credential=control_key, timeout=5.0)


def test_the_secret_never_crosses_the_wire(disp, dispatcher_credentials):
    """The bytes a client sends hold the proof, never the token (nor its hex)."""
    creds = json.loads(dispatcher_credentials[1].read_text())
    token = creds["analyzer"]["token"]
    hello = "analyzer:minard_dispatch_push"
    with socket.create_connection(("127.0.0.1", disp.port), timeout=5) as sock:
        sock.sendall(framing.encode_frame("HELLO", hello))
        decoder = framing.FrameDecoder()
        while (frame := decoder.next()) is None:
            decoder.feed(sock.recv(4096))
        response, signature = handshake.respond(token, hello, frame.text)
        sent = framing.encode_frame("AUTH", response)
        sock.sendall(sent)
        while (reply := decoder.next()) is None:
            decoder.feed(sock.recv(4096))
    assert reply.text.split(":")[3] == signature.hex()
    assert token.encode() not in sent and token.encode().hex().encode() not in sent


def test_a_revoked_key_is_refused_and_its_open_connection_closed(start_dispatcher, tmp_path):
    keys_file, creds_file = tmp_path / "keys.json", tmp_path / "creds.json"
    issue_credentials(KeyStore(keys_file), str(creds_file))
    disp = start_dispatcher(dispatcher_keys_file=keys_file)
    own = {"dispatcher_credentials_file": str(creds_file)}
    analyzer = DispatchClient.connect(disp.address, "analyzer", cfg=own, timeout=5.0)
    assert KeyStore(keys_file).revoke("minard_dispatch_push")
    frame = analyzer.recv(5.0)
    assert frame is not None and frame.text == "ERROR:AUTH: key revoked"
    with pytest.raises(ConnectionClosed):
        analyzer.recv(5.0)
    with pytest.raises(CommandFailed, match="authentication failed"):
        DispatchClient.connect(disp.address, "analyzer", cfg=own, timeout=5.0)
    assert stats_with(disp, own)["keys_revoked"] == 1


def stats_with(proc, cfg) -> dict:
    with DispatchClient.connect(proc.address, "control", cfg=cfg, timeout=5.0) as control:
        return control.stats()


def test_a_role_connecting_from_outside_its_host_allow_list_is_refused(start_dispatcher):
    disp = start_dispatcher(dispatcher_control_hosts="10.0.0.0/8,192.168.1.7")
    with pytest.raises(CommandFailed, match="role control may not connect from 127.0.0.1"):
        DispatchClient.connect(disp.address, "control", timeout=5.0)
    with DispatchClient.connect(disp.address, "source", timeout=5.0) as source:
        assert source.stats()["hosts_refused"] == 1


# --------------------------------------------------------------------------
# What each role may do
# --------------------------------------------------------------------------

#: Every command with an argument that, when allowed, has no lasting effect.
HARMLESS = {
    "BEGINTAPE": "BEGINTAPE:x", "ENDTAPE": "ENDTAPE", "FINISHED": "FINISHED",
    "ACCTREC": "ACCTREC:", "SCALERSUM": "SCALERSUM:", "SCALERREC": "SCALERREC:a=1",
    "DROP": "DROP:99999", "BROADCAST": "BROADCAST:nowhere:X", "DUMP": "DUMP",
    "ANALYZERS?": "ANALYZERS?", "SCALERS?": "SCALERS?", "STATS?": "STATS?", "DIR?": "DIR?",
    "EXIT": "EXIT", "SHUTDOWN": "SHUTDOWN", "QUIT": "QUIT",
}
#: The default grants (docs/protocol.md section 2.2).
GRANTS = {
    "source": {"BEGINTAPE", "ENDTAPE"},
    "analyzer": {"FINISHED", "ACCTREC", "SCALERSUM", "SCALERREC"},
    "writer": set(),
    "control": {"EXIT", "SHUTDOWN", "DROP", "BROADCAST", "DUMP"},
}
EVERYONE = {"ANALYZERS?", "SCALERS?", "STATS?", "DIR?", "QUIT"}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_send_exactly_the_commands_config_grants_it(disp, role):
    allowed = GRANTS[role] | EVERYONE
    with DispatchClient.connect(disp.address, role, timeout=5.0) as client:
        for name, text in HARMLESS.items():
            if name in allowed and name in ("EXIT", "SHUTDOWN", "QUIT"):
                continue  # granted; the lifecycle tests exercise them
            reply = client.command(text)
            refused = reply == f"ERROR:{name}: not allowed for a {role} client"
            assert refused == (name not in allowed), (role, text, reply)
        counted = client.stats()["commands_refused"]
    assert counted == len(set(HARMLESS) - allowed)
    assert disp.proc.poll() is None


def test_grants_come_from_config(start_dispatcher):
    disp = start_dispatcher(dispatcher_control_commands="STATS?",
                            dispatcher_analyzer_commands="*")
    with DispatchClient.connect(disp.address, "control", timeout=5.0) as control:
        assert control.command("DUMP") == "ERROR:DUMP: not allowed for a control client"
        assert control.command("STATS?").startswith("STATS:")
    with DispatchClient.connect(disp.address, "analyzer", timeout=5.0) as analyzer:
        assert analyzer.command("DUMP") == "OK:DUMP"


# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------

def test_a_connection_that_never_authenticates_is_closed_after_the_handshake_timeout(start_dispatcher):
    disp = start_dispatcher(dispatcher_handshake_timeout=1.0)
    t0 = time.monotonic()
    frames = raw_frames(disp.port, framing.encode_frame("HELLO", "control:control"))
    took = time.monotonic() - t0
    assert [f.tag for f in frames] == ["AUTH", "CMD"]
    assert frames[1].text.startswith("ERROR:AUTH: handshake timeout")
    assert 0.9 < took < 4.0
    assert stats(disp)["handshake_timeouts"] == 1


def test_a_silent_control_connection_is_closed_after_the_idle_timeout(start_dispatcher):
    disp = start_dispatcher(dispatcher_idle_timeout=1.0)
    control = DispatchClient.connect(disp.address, "control", timeout=5.0)
    analyzer = DispatchClient.connect(disp.address, "analyzer", timeout=5.0)
    frame = control.recv(5.0)
    assert frame is not None and frame.text.startswith("ERROR:idle for more than 1s")
    with pytest.raises(ConnectionClosed):
        control.recv(5.0)
    assert analyzer.command("STATS?").startswith("STATS:")  # analyzers are never idle-closed
    assert analyzer.stats()["idle_timeouts"] == 1
    analyzer.close()


def test_a_large_frame_before_authentication_closes_the_connection_without_buffering(disp):
    header = framing.HEADER.pack(b"HELLO\0\0\0", 10 * 1024 * 1024)
    frames = raw_frames(disp.port, header + b"x" * 1000)
    assert len(frames) == 1 and "above the limit of 512" in frames[0].text
    assert stats(disp)["protocol_errors"] == 1


def test_connections_beyond_the_maximum_are_refused_at_once(start_dispatcher):
    disp = start_dispatcher(dispatcher_max_connections=10)
    socks = [socket.create_connection(("127.0.0.1", disp.port), timeout=5) for _ in range(10)]
    try:
        # The server accepts in arrival order: the 11th comes after the 10 above.
        with socket.create_connection(("127.0.0.1", disp.port), timeout=5) as extra:
            frames = read_until_closed(extra)
        assert [f.text for f in frames] == ["ERROR:too many connections"]
    finally:
        for s in socks:
            s.close()
    s = wait_for(lambda: _try_stats(disp), 10, "a free slot again")
    # The extra one, and any STATS? attempt made before the closed slots were freed.
    assert s["connections_refused"] >= 1


def _try_stats(proc) -> dict | None:
    """STATS? or None while the dispatcher still refuses (closed slots not yet freed)."""
    try:
        return stats(proc)
    except (CommandFailed, ConnectionError, OSError):
        return None


@pytest.mark.slow
def test_500_idle_connections_do_not_grow_memory_and_are_all_closed(start_dispatcher):
    disp = start_dispatcher(dispatcher_max_connections=1000, dispatcher_handshake_timeout=3.0)
    stats(disp)  # warm up: the first client has been served
    before = rss_kib(disp.proc.pid)
    socks = [socket.create_connection(("127.0.0.1", disp.port), timeout=5) for _ in range(500)]
    try:
        for s in socks[::2]:  # half of them at least start a HELLO
            s.sendall(framing.encode_frame("HELLO", "analyzer:minard_dispatch_push"))
        wait_for(lambda: stats(disp)["connections"] >= 501, 10, "500 connections accepted")
        grown = rss_kib(disp.proc.pid) - before
        assert grown < 10 * 1024, f"500 idle connections grew the dispatcher by {grown} KiB"
        for s in socks:
            assert read_until_closed(s, 10)[-1].text.startswith("ERROR:AUTH: handshake timeout")
    finally:
        for s in socks:
            s.close()
    assert stats(disp)["handshake_timeouts"] == 500
