"""Every transaction a real redis-server runs, as it runs it (``MONITOR``), for tests.

:class:`TransactionRecorder` opens one ``MONITOR`` connection and, in a
thread, reads every command the server executes, from every client (pool
workers and other processes included).  Commands are grouped per client
connection into transactions: the keys ``WATCH``ed before a ``MULTI`` plus the
commands up to its ``EXEC`` (Redis shows a transaction's commands when it runs
them).  Commands run by a Lua script (client ``lua``) are left out: the
script's call names its keys.  :meth:`TransactionRecorder.keys_of` asks the
server which arguments of a command are keys (``COMMAND GETKEYS``), so no
key rule is guessed here.
"""

from __future__ import annotations

import re
import threading

import redis as redis_py

_LINE = re.compile(rb'^[\d.]+ \[\d+ ([^\]]+)\] (.*)$', re.DOTALL)
_ARG = re.compile(rb'"((?:\\.|[^"\\])*)"', re.DOTALL)
_ESCAPE = re.compile(rb'\\(x[0-9a-fA-F]{2}|.)', re.DOTALL)
_SIMPLE = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unescape(raw: bytes) -> bytes:
    """An argument as MONITOR quotes it (``sdscatrepr``) back to its bytes."""
    def one(m):
        code = m.group(1)
        if code[:1] == b"x" and len(code) == 3:
            return bytes([int(code[1:], 16)])
        return _SIMPLE.get(code, code)
    return _ESCAPE.sub(one, raw)


def parse(line: bytes) -> tuple[str, list[bytes]] | None:
    """``(client, args)`` of one MONITOR line, None for a line that is not a command."""
    m = _LINE.match(line)
    if not m:
        return None
    return m.group(1).decode(), [_unescape(a) for a in _ARG.findall(m.group(2))]


class TransactionRecorder:
    """Records the transactions of a redis-server (see the module); a context manager."""

    def __init__(self, url: str):
        self.url = url
        self.client = redis_py.Redis.from_url(url)
        self.conn = self.client.connection_pool.get_connection()
        self.transactions: list[list[list[bytes]]] = []
        self.commands = 0
        self._open: dict[str, list[list[bytes]]] = {}  # client -> WATCH/MULTI in progress
        self._in_multi: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self):
        self.conn.send_command("MONITOR")
        assert self.conn.read_response() in (b"OK", "OK")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop recording (after a marker command has come through, so nothing is cut off)."""
        if self._stop.is_set():
            return
        self.client.echo("minard-monitor-end")
        self._thread.join(30)
        self._stop.set()
        self.conn.disconnect()
        self.client.connection_pool.disconnect()

    def _read(self) -> None:
        while True:
            try:
                line = self.conn.read_response(disable_decoding=True)
            except (redis_py.RedisError, OSError):
                return
            parsed = parse(line if isinstance(line, bytes) else str(line).encode())
            if parsed is None:
                continue
            who, args = parsed
            if args[:2] == [b"echo", b"minard-monitor-end"] or args[:2] == [b"ECHO", b"minard-monitor-end"]:
                return
            self._add(who, args)

    def _add(self, who: str, args: list[bytes]) -> None:
        """Fold one executed command into its client's transaction in progress."""
        if who == "lua" or not args:
            return
        self.commands += 1
        name = args[0].upper()
        if name == b"WATCH":
            self._open.setdefault(who, []).append(args)
        elif name == b"MULTI":
            self._open.setdefault(who, []).append(args)
            self._in_multi.add(who)
        elif name == b"EXEC" and who in self._in_multi:
            self.transactions.append([a for a in self._open.pop(who) if a[0].upper() != b"MULTI"])
            self._in_multi.discard(who)
        elif name in (b"UNWATCH", b"DISCARD"):
            self._open.pop(who, None)
            self._in_multi.discard(who)
        elif who in self._in_multi:
            self._open[who].append(args)

    def keys_of(self, transaction: list[list[bytes]]) -> set[bytes]:
        """Every key the commands of *transaction* touch, as the server names them."""
        keys: set[bytes] = set()
        with self.client.pipeline(transaction=False) as pipe:
            for args in transaction:
                pipe.command_getkeys(*args)
            for reply in pipe.execute(raise_on_error=False):
                if not isinstance(reply, Exception):  # a command without keys
                    keys.update(k if isinstance(k, bytes) else str(k).encode() for k in reply)
        return keys
