"""A small blocking client of the dispatcher (replay, recorder, producers, tests).

    with DispatchClient.connect("127.0.0.1:7000", "analyzer", "monitor") as c:
        for frame in c.frames():
            if frame.tag == "RAWDATA":
                ...                       # frame.payload is a 'PMT ' dispatch record
            elif frame.text == "ENDTAPE":
                c.send_command("FINISHED")

The socket stays in blocking mode so that a data source's ``sendall`` simply
waits while the dispatcher back-pressures it; reads use ``select`` so that
every receive has a timeout.  ``docs/protocol.md`` describes the protocol.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import click
import numpy as np

from minard.config import pass_config
from minard.formats import handshake
from minard.formats.framing import (
    AUTH,
    CMD,
    DEFAULT_MAX_FRAME,
    HELLO,
    RAWDATA,
    RECHDR,
    Frame,
    FrameDecoder,
    command_frame,
    encode_frame,
    encode_frames,
    encode_rawbatch,
)

log = logging.getLogger("minard.dispatcher.client")

ROLES = ("source", "analyzer", "writer", "control")
READ_SIZE = 1 << 20


class ConnectionClosed(ConnectionError):
    """The dispatcher closed the connection."""


class CommandFailed(RuntimeError):
    """The dispatcher answered a command with ``ERROR:...``."""


class Credential:
    """A program's name and dispatcher token (the secret never leaves this process)."""

    __slots__ = ("name", "token")

    def __init__(self, name: str, token: str):
        self.name, self.token = name, token

    def __repr__(self) -> str:  # never show the token in a log or a traceback
        return f"Credential({self.name!r}, <token>)"


def credentials_path(cfg) -> str:
    """``dispatcher_credentials_file`` or ``var_dir/dispatcher_credentials.json``."""
    path = str(cfg["dispatcher_credentials_file"])
    if not path:
        path = os.path.join(str(cfg["var_dir"]), "dispatcher_credentials.json")
    if not os.path.isabs(path):
        from minard.config import ROOT

        path = str(ROOT / path)
    return path


def load_credential(role: str, cfg=None) -> Credential | None:
    """The credential this host holds for *role*, or None (no file, no entry).

    The file is JSON ``{role: {"name": program, "token": secret}}`` (mode 0600,
    written by ``minard up`` or by hand from ``minard keys add``).  Processes
    pass their configuration; *cfg* None (an ad-hoc client in a test or a
    shell) loads it from ``MINARD_CONFIG`` and ``MINARD_*``.
    """
    if cfg is None:
        from minard import config as config_mod

        cfg = config_mod.load()
    try:
        with open(credentials_path(cfg), encoding="utf-8") as fh:
            entry = json.load(fh).get(role)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("token"):
        return None
    return Credential(str(entry["name"]), str(entry["token"]))


#: The program each role's key belongs to in a stack (the defaults of ``dispatcher_<role>_programs``).
DEFAULT_PROGRAMS = {"source": "replay", "analyzer": "minard_dispatch_push",
                    "writer": "recorder", "control": "control"}


def issue_credentials(store, path, programs: dict[str, str] | None = None,
                      known: dict[str, str] | None = None) -> dict[str, Credential]:
    """Make sure *path* holds a working key for every role; return the credentials.

    *store* is a :class:`minard.ops.keys.KeyStore`; a token in *path* that no
    longer verifies or has no dispatcher record (revoked, replaced, older key
    file) is replaced by the program's token in *known* (name -> token, e.g.
    the pinger's) if that one works, else issued again.  *path* is written
    with mode 0600.
    """
    known = known or {}
    programs = dict(DEFAULT_PROGRAMS if programs is None else programs)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    out, changed = {}, False
    for role, name in programs.items():
        entry = data.get(role) if isinstance(data.get(role), dict) else {}
        token = entry.get("token") if entry.get("name") == name else None
        if not _works(store, name, token):
            token = known.get(name) if _works(store, name, known.get(name)) else store.add(name, replace=True)
            data[role] = {"name": name, "token": token}
            changed = True
        out[role] = Credential(name, token)
    if changed or not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return out


def _works(store, name: str, token: str | None) -> bool:
    """True if *token* is *name*'s active program token and has a dispatcher record."""
    return bool(token) and store.dispatch_record(name) is not None and store.verify(
        name, token, kind="program")


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``host`` (with *default_port*) or ``:port`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"bad dispatcher address {text!r} (want HOST:PORT)")
        return text or "127.0.0.1", default_port
    if not port.isdigit():
        raise ValueError(f"bad dispatcher address {text!r} (want HOST:PORT)")
    return host or "127.0.0.1", int(port)


def is_reply(text: str, command: str) -> bool:
    """True if CMD text *text* is the reply to *command* (OK:, ERROR: or NAME:)."""
    name = command.strip().partition(":")[0].rstrip("?")
    return text.startswith(("OK:", "ERROR:", name + ":")) or text == name


class DispatchClient:
    """One connection to the dispatcher, identified by a role."""

    def __init__(self, host: str, port: int, role: str = "control", name: str = "",
                 timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME,
                 rcvbuf: int | None = None, sndbuf: int | None = None, batch: bool = False,
                 credential: Credential | None = None, cfg=None):
        """Connect, send HELLO and authenticate; ``socket_number`` is the server-side socket.

        *batch*: ask for RAWBATCH frames as the source sent them (otherwise
        the dispatcher expands them into RAWDATA frames for this client).
        *credential*: the program key to authenticate with; by default the
        one the configuration's credentials file holds for *role*
        (:func:`load_credential`).  With a credential, the HELLO name is its
        program name.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if credential is None:
            credential = load_credential(role, cfg)
        self.credential = credential
        if credential is not None:
            name = credential.name
        self.host, self.port, self.role, self.name = host, port, role, name
        self.batch = batch
        self.timeout = timeout
        self.decoder = FrameDecoder(max_frame)
        self.backlog: deque[Frame] = deque()
        self.closed = False
        self.sock = self._open(rcvbuf, sndbuf)
        self.socket_number = self._hello()

    def _open(self, rcvbuf: int | None, sndbuf: int | None) -> socket.socket:
        """The TCP connection (buffer sizes must be set before connecting)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def _hello(self) -> int:
        """HELLO role[:name[:batch]], answer the AUTH challenge, wait for ``OK:HELLO:<socket>``."""
        hello = f"{self.role}:{self.name}" if self.name or self.batch else self.role
        if self.batch:
            hello += ":batch"
        self.sock.sendall(encode_frame(HELLO, hello))
        frame = self._handshake_frame()
        expected_signature = None
        if frame.tag == AUTH:
            if self.credential is None:
                self.close()
                raise CommandFailed(f"ERROR:AUTH: the dispatcher wants a key for role {self.role}"
                                    " and this host has none (dispatcher_credentials_file)")
            try:
                response, expected_signature = handshake.respond(
                    self.credential.token, hello, frame.text)
            except handshake.HandshakeError as exc:
                self.close()
                raise CommandFailed(f"ERROR:AUTH: {exc}") from None
            self.sock.sendall(encode_frame(AUTH, response))
            frame = self._handshake_frame()
        reply = frame.text if frame.tag == CMD else f"ERROR:unexpected {frame.tag} frame"
        if not reply.startswith("OK:HELLO:"):
            self.close()
            raise CommandFailed(reply)
        fields = reply.split(":")
        if expected_signature is not None:
            got = fields[3] if len(fields) > 3 else ""
            if not hmac.compare_digest(got, expected_signature.hex()):
                self.close()
                raise CommandFailed("ERROR:AUTH: the dispatcher did not prove it knows this"
                                    " program's key (wrong ServerSignature)")
        return int(fields[2])

    def _handshake_frame(self) -> Frame:
        """The next AUTH frame or reply CMD (frames before it are kept for recv)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                frame = self._read_frame(max(0.0, deadline - time.monotonic()))
            except ConnectionClosed:
                self.close()
                raise
            if frame is None:
                self.close()
                raise TimeoutError(f"no reply to HELLO within {self.timeout}s")
            if frame.tag == AUTH or (frame.tag == CMD and frame.text.startswith(("OK:", "ERROR:"))):
                return frame
            self.backlog.append(frame)

    @classmethod
    def connect(cls, address: str | tuple[str, int], role: str = "control",
                name: str = "", **kwargs) -> DispatchClient:
        """Connect to ``"host:port"`` (or a (host, port) tuple) as *role*."""
        host, port = parse_address(address) if isinstance(address, str) else address
        return cls(host, port, role, name, **kwargs)

    # -- sending -------------------------------------------------------------
    def send_frame(self, tag: str, payload: bytes | str) -> None:
        """Send one frame."""
        self.sock.sendall(encode_frame(tag, payload))

    def send_raw(self, data: bytes) -> None:
        """Send bytes that are already framed (many frames in one call)."""
        self.sock.sendall(data)

    def send_parts(self, parts: Sequence) -> None:
        """Send several buffers as one stream of bytes (scatter-gather, no join)."""
        sent = self.sock.sendmsg(parts)
        total = sum(memoryview(p).nbytes for p in parts)
        if sent < total:  # a partial write: send the rest the simple way
            self.sock.sendall(memoryview(b"".join(parts))[sent:])

    def send_command(self, text: str) -> None:
        """Send a CMD frame without waiting for its reply."""
        self.sock.sendall(command_frame(text))

    def send_dispatch(self, payloads: Iterable[bytes], tag: str = RAWDATA) -> None:
        """Send dispatch records (12-byte generic header + record) in one call."""
        self.sock.sendall(encode_frames(tag, payloads))

    def send_records(self, pmt_records: Iterable[bytes]) -> None:
        """Send PmtEventRecords as 'PMT ' dispatch records (RAWDATA), batched."""
        from minard.formats.pmt import pack_dispatch

        self.send_dispatch([pack_dispatch(r) for r in pmt_records])

    def send_batch(self, dispatch_records: Sequence[bytes]) -> None:
        """Send 'PMT ' dispatch records as one RAWBATCH frame."""
        lengths = np.fromiter(map(len, dispatch_records), np.int64, len(dispatch_records))
        self.sock.sendall(encode_rawbatch(lengths, b"".join(dispatch_records)))

    def send_record(self, pmt_record: bytes) -> None:
        """Send one PmtEventRecord as a RAWDATA frame."""
        self.send_records([pmt_record])

    def send_other(self, payload: bytes) -> None:
        """Send one non-PMT dispatch record (RUN, TRIG, ...) as RECHDR."""
        self.send_frame(RECHDR, payload)

    def command(self, text: str, timeout: float | None = None, check: bool = False) -> str:
        """Send *text* and return the reply text; frames arriving meanwhile are kept.

        With *check*, an ``ERROR:`` reply raises CommandFailed.
        """
        self.send_command(text)
        reply = self._wait_reply(text, self.timeout if timeout is None else timeout)
        if check and reply.startswith("ERROR:"):
            raise CommandFailed(reply)
        return reply

    def _wait_reply(self, command: str, timeout: float) -> str:
        """Read until the reply to *command*; other frames go to the backlog."""
        deadline = time.monotonic() + timeout
        kept: list[Frame] = []
        try:
            while True:
                frame = self._read_frame(max(0.0, deadline - time.monotonic()))
                if frame is None:
                    raise TimeoutError(f"no reply to {command!r} within {timeout}s")
                if frame.tag == CMD and is_reply(frame.text, command):
                    return frame.text
                kept.append(frame)
        finally:
            self.backlog.extend(kept)

    def stats(self) -> dict:
        """STATS? parsed from JSON."""
        reply = self.command("STATS?", check=True)
        return json.loads(reply.partition(":")[2])

    def finished(self) -> None:
        """Analyzer: answer ENDTAPE with FINISHED."""
        self.send_command("FINISHED")

    # -- receiving -----------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None after *timeout* seconds (None = self.timeout).

        Raises ConnectionClosed when the dispatcher closed the connection.
        """
        if self.backlog:
            return self.backlog.popleft()
        return self._read_frame(self.timeout if timeout is None else timeout)

    def _read_frame(self, timeout: float) -> Frame | None:
        """Decode one frame from the socket, reading as needed until *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.next()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if not self._fill(max(0.0, remaining)) and remaining <= 0:
                return None

    def _fill(self, timeout: float) -> bool:
        """Read what the socket has within *timeout*; False if nothing came."""
        if self.closed:
            raise ConnectionClosed("connection already closed")
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        try:
            data = self.sock.recv(READ_SIZE)
        except ConnectionResetError as exc:
            raise ConnectionClosed(f"dispatcher reset the connection: {exc}") from None
        if not data:
            raise ConnectionClosed("dispatcher closed the connection")
        self.decoder.feed(data)
        return True

    def poll(self) -> list[Frame]:
        """Every frame available now, without blocking."""
        out = list(self.backlog)
        self.backlog.clear()
        while self._fill(0.0):
            pass
        out.extend(self.decoder.frames())
        return out

    def frames(self, timeout: float | None = None) -> Iterator[Frame]:
        """Yield frames until the connection closes (or nothing for *timeout* s)."""
        while True:
            try:
                frame = self.recv(timeout)
            except ConnectionClosed:
                return
            if frame is None:
                return
            yield frame

    def wait_command(self, predicate: Callable[[str], bool] | str,
                     timeout: float | None = None) -> str:
        """Skip frames until a CMD whose text matches; return its text.

        *predicate* is a callable or the exact text (e.g. ``"ALLFINISHED"``).
        Data frames read meanwhile are discarded; raises TimeoutError.
        """
        match = predicate if callable(predicate) else (lambda t: t == predicate)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self.recv(max(0.0, deadline - time.monotonic()))
            if frame is None:
                raise TimeoutError(f"no matching command within {timeout}s")
            if frame.tag == CMD and match(frame.text):
                return frame.text

    # -- lifetime ------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def __enter__(self) -> DispatchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_with_retry(address: str | tuple[str, int], role: str, name: str = "",
                       retry_for: float | None = 30.0, first_delay: float = 0.1,
                       max_delay: float = 2.0, should_stop: Callable[[], bool] | None = None,
                       **kwargs) -> DispatchClient:
    """Connect, retrying with exponential back-off (the dispatcher may restart).

    *retry_for* None retries forever; *should_stop* aborts the wait (raises
    ConnectionClosed).  Other keyword arguments go to DispatchClient.
    A refused handshake (no key, wrong or revoked key) is retried too, and
    logged once per distinct reason: the key file may be fixed while we wait,
    and a monitoring process must not die of it.
    """
    deadline = None if retry_for is None else time.monotonic() + retry_for
    delay = first_delay
    last_refusal = None
    while True:
        try:
            return DispatchClient.connect(address, role, name, **kwargs)
        except (OSError, TimeoutError, CommandFailed) as exc:
            if isinstance(exc, CommandFailed) and str(exc) != last_refusal:
                last_refusal = str(exc)
                log.error("dispatcher %s refused us as %s: %s; retrying", address, role, exc)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ConnectionError(f"cannot connect to dispatcher {address}: {exc}") from exc
        if should_stop is not None and should_stop():
            raise ConnectionClosed("stopped while reconnecting")
        time.sleep(delay)
        delay = min(max_delay, delay * 2)


def dispatcher_address(cfg, given: str | None = None) -> str:
    """``HOST:PORT`` of the dispatcher: *given* (``HOST``, ``:PORT`` or ``HOST:PORT``)
    completed from ``dispatcher_host`` and ``dispatcher_port``."""
    if not given:
        return f"{cfg['dispatcher_host']}:{cfg['dispatcher_port']}"
    try:
        host, port = parse_address(given, int(cfg["dispatcher_port"]))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return f"{host}:{port}"


def query(address: str | tuple[str, int], text: str, timeout: float = 10.0, **kwargs) -> str:
    """Open a control connection, send one command, return its reply.

    Keyword arguments (``credential``, ``cfg``) go to DispatchClient.
    """
    with DispatchClient.connect(address, "control", "query", timeout=timeout, **kwargs) as client:
        return client.command(text)


@click.command("send")
@click.argument("command", nargs=-1, required=True)
@click.option("--dispatcher", "address", default=None, metavar="HOST:PORT",
              help="Dispatcher address [dispatcher_host:dispatcher_port].")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the reply.")
@pass_config
def send_cmd(cfg, command, address, timeout):
    """Send one text command (e.g. ANALYZERS?) to a dispatcher and print the reply.

    Words are joined with spaces.  Exits with status 1 on an ERROR reply.
    """
    address = dispatcher_address(cfg, address)
    text = " ".join(command)
    try:
        reply = query(address, text, timeout, cfg=cfg)
    except ConnectionClosed:
        if text.strip() == "EXIT":
            click.echo("OK:EXIT (connection closed)")
            return
        raise click.ClickException(f"dispatcher {address} closed the connection") from None
    except CommandFailed as exc:  # the handshake was refused (no key, wrong key, role)
        raise click.ClickException(f"dispatcher {address}: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise click.ClickException(f"dispatcher {address}: {exc}") from None
    click.echo(reply)
    if reply.startswith("ERROR:"):
        sys.exit(1)
