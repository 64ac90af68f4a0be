"""The dispatcher's accounting journal: per-run event counts that survive ``kill -9``.

The dispatcher counts each run's events (``source_events``, ``dispatched``,
``dropped:<reason>``) in memory and adds them to Redis once per
``dispatcher_accounting_period`` (:func:`minard.store.runs.add_accounting`).
Killed between two writes, it would forget the events it received since the
last one, and they would appear nowhere: not stored, not counted, and not in
``unaccounted`` either (which is computed from ``source_events``).

So every change to the pending counts is also written, whole, to a small
local file (``<dispatcher_accounting_dir>/pending_accounting.json``, mode
0600) with one ``pwrite`` of a few hundred bytes: the kernel keeps it when the
process is killed.  A restarted dispatcher reads it back and adds what its
predecessor had not written.

The journal names the Redis it counts for (its URL without password) and
is locked while a dispatcher uses it: a journal left for another Redis is
not added to this one, and a second dispatcher on the same directory runs
without one (logged).

A write to Redis that failed may still have been applied (the connection
broke after ``EXEC``), so each write carries an *epoch*: the journal keeps
the writes not yet confirmed, with their epochs, and each Redis write also
raises this journal's entry in each run's sorted set ``{run:<run>}:epochs``
(``ZADD GT``, in the same transaction as that run's counts: one transaction
per run, since each run has its own Redis Cluster hash slot).  Before the
next write, a pending write whose epoch is at most the one stored for a run
was applied to that run; any other is added again.  Writes are serialized by the dispatcher, so epochs reach Redis in
order.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
from collections import Counter
from pathlib import Path

log = logging.getLogger("minard.dispatcher.journal")

FILE_NAME = "pending_accounting.json"

Runs = dict[int, Counter]


def _encode(runs: Runs) -> dict:
    return {str(run): dict(c) for run, c in runs.items() if c}


def _decode(data) -> Runs:
    """Per-run counts from the journal's JSON, skipping anything malformed."""
    out: Runs = {}
    if not isinstance(data, dict):
        return out
    for run, counts in data.items():
        if not (isinstance(run, str) and run.isdigit() and isinstance(counts, dict)):
            continue
        good = {k: v for k, v in counts.items()
                if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)}
        if good:
            out[int(run)] = Counter(good)
    return out


def merge(into: Runs, more: Runs) -> Runs:
    """Add the counts *more* to *into* (in place); return *into*."""
    for run, counts in more.items():
        into.setdefault(run, Counter()).update(counts)
    return into


class AccountingJournal:
    """The journal file of one dispatcher (see the module).

    ``ident`` names this journal in the runs' ``{run:<run>}:epochs`` (host and a
    random part, new for a new file); ``epoch`` is the last epoch given out;
    ``unconfirmed`` the Redis writes not known to have been applied.
    """

    def __init__(self, directory: str | os.PathLike, target: str = ""):
        self.path = Path(directory) / FILE_NAME
        self.target = target  # the Redis the counts are for (URL without password)
        self.fd: int | None = None
        self.ident = ""
        self.epoch = 0
        self.unconfirmed: list[tuple[int, Runs]] = []

    def open(self) -> Runs:
        """Open (or create) the journal; return the pending counts a killed predecessor left.

        Its unconfirmed writes are kept in :attr:`unconfirmed` for the next
        write to settle (:meth:`to_write`).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OSError(f"{self.path} is in use by another dispatcher") from None
        os.fchmod(fd, 0o600)
        state = self._read()
        if state is not None and state.get("target") != self.target:
            log.warning("accounting journal %s was written for Redis %s, not %s: its counts are not added",
                        self.path, state.get("target"), self.target)
            state = None
        pending: Runs = {}
        if state is not None:
            self.ident = state["id"]
            self.epoch = state["epoch"]
            self.unconfirmed = [(e, _decode(d)) for e, d in state["unconfirmed"]]
            pending = _decode(state["pending"])
            if pending or self.unconfirmed:
                log.warning("accounting journal %s: recovered the counts of runs %s not yet in Redis"
                            " and %d unconfirmed write(s)", self.path, sorted(pending),
                            len(self.unconfirmed))
        else:
            self.ident = f"{socket.gethostname()}:{secrets.token_hex(6)}"
        self.fd = fd
        return pending

    def _read(self) -> dict | None:
        """The journal's last state, or None if absent or unreadable."""
        try:
            raw = self.path.read_bytes()
            size, _, rest = raw.partition(b"\n")
            state = json.loads(rest[:int(size)])
        except (OSError, ValueError):
            return None
        ok = (isinstance(state, dict) and isinstance(state.get("id"), str)
              and isinstance(state.get("epoch"), int) and isinstance(state.get("unconfirmed"), list)
              and all(isinstance(u, list) and len(u) == 2 and isinstance(u[0], int)
                      for u in state["unconfirmed"]))
        if not ok:
            log.warning("accounting journal %s is unreadable: starting a new one", self.path)
            return None
        return state

    def write(self, pending: Runs) -> None:
        """Record the pending counts and the unconfirmed writes (one ``pwrite``)."""
        if self.fd is None:
            return
        body = json.dumps({"id": self.ident, "target": self.target, "epoch": self.epoch,
                           "pending": _encode(pending),
                           "unconfirmed": [[e, _encode(d)] for e, d in self.unconfirmed]},
                          separators=(",", ":")).encode()
        os.pwrite(self.fd, b"%d\n" % len(body) + body, 0)

    def begin(self, pending: Runs) -> tuple[int, Runs, list[tuple[int, Runs]]]:
        """Start a Redis write of *pending*: (its epoch, the counts, the earlier unconfirmed writes).

        The write joins :attr:`unconfirmed` until :meth:`confirmed`.
        """
        self.epoch += 1
        earlier = list(self.unconfirmed)
        self.unconfirmed.append((self.epoch, pending))
        return self.epoch, pending, earlier

    def confirmed(self) -> None:
        """The last write was applied: every earlier one is settled too."""
        self.unconfirmed = []

    def close(self) -> None:
        """Close the file and release its lock (its content stays for the next start)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
