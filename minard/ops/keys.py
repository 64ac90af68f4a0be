"""Credentials: per-program tokens and shift-crew logins, stored only as salted hashes.

The key file (``keys_file``, default ``var_dir/keys.json``) is a JSON object
``{"version": 1, "entries": {NAME: ENTRY}}`` written atomically with mode 0600.
An entry holds its kind (``program`` or ``user``), the scrypt parameters, a
random salt and the derived hash; never the secret itself.  A new secret is
shown once by ``minard keys add`` and cannot be recovered afterwards.

Verifying a secret costs one scrypt derivation (tens of milliseconds, which is
the point for passwords).  Program tokens are long random strings sent with
every heartbeat and log record, so a successful verification is remembered in
memory as an HMAC under a per-process random key; the memory is dropped as soon
as the key file changes, so a revocation takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from pathlib import Path

import click

from minard.config import pass_config
from minard.formats import handshake

log = logging.getLogger(__name__)

#: Names of programs and users: what a file name or a URL segment may safely hold.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KINDS = ("program", "user")
#: scrypt cost: n=2**14, r=8 uses 16 MiB and ~50 ms per derivation.
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
TOKEN_PREFIX = "mnd_"


def valid_name(name: object) -> bool:
    """True if *name* is a safe program or user name (no path separators, no '..')."""
    return isinstance(name, str) and bool(NAME_RE.match(name)) and ".." not in name


def new_secret() -> str:
    """A fresh random token (256 bits), recognisable by its prefix in a leak scan."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _derive(secret: str, salt: bytes, params: dict) -> bytes:
    """The scrypt hash of *secret* with *salt* and cost *params*."""
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=int(params["n"]), r=int(params["r"]),
        p=int(params["p"]), maxmem=256 * 1024 * 1024, dklen=32,
    )


def hash_secret(secret: str) -> dict:
    """A storable record of *secret*: algorithm, parameters, salt and hash (hex)."""
    salt = secrets.token_bytes(16)
    return {"algo": "scrypt", **SCRYPT, "salt": salt.hex(), "hash": _derive(secret, salt, SCRYPT).hex()}


def check_secret(secret: str, record: dict) -> bool:
    """Constant-time check of *secret* against a record made by :func:`hash_secret`."""
    if record.get("algo") != "scrypt" or not record.get("hash"):
        return False
    try:
        got = _derive(secret, bytes.fromhex(record["salt"]), record)
        want = bytes.fromhex(record["hash"])
    except (KeyError, ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


#: A record nobody's secret matches, hashed for unknown names (constant work).
_DUMMY = {"algo": "scrypt", **SCRYPT, "salt": "00" * 16, "hash": "00" * 32}


class KeyStore:
    """The key file: add, list, revoke and verify credentials.

    Safe to share between threads; several processes may read it at once and
    writes replace it atomically.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: dict[str, dict] = {}
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    @classmethod
    def from_config(cls, cfg) -> KeyStore:
        """The key store named by ``keys_file`` (default ``var_dir/keys.json``)."""
        from minard.ops.programs import ops_path

        return cls(ops_path(cfg, "keys_file", "keys.json"))

    # -- reading ------------------------------------------------------------

    def _file_stamp(self) -> tuple | None:
        """Identity of the file's current version (inode, size, mtime), or None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> dict[str, dict]:
        """The entries, re-read only when the file changed since the last read."""
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._entries = self._read()
            self._verified.clear()
            self._stamp = stamp
        return self._entries

    def _read(self) -> dict[str, dict]:
        """Parse the key file; a missing file means no credentials."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning("key file %s is readable by others; setting mode 0600", self.path)
            try:
                os.chmod(self.path, 0o600)
            except OSError:
                pass
        with open(self.path, encoding="utf-8") as fh:
            data = json.load(fh)
        entries = data.get("entries", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def entries(self) -> dict[str, dict]:
        """A copy of every entry (hashes included; callers must not display them)."""
        with self._lock:
            return {k: dict(v) for k, v in self._load().items()}

    def listing(self) -> list[dict]:
        """Name, kind, creation and revocation time of every entry: no hashes."""
        rows = []
        for name, e in sorted(self.entries().items()):
            rows.append({
                "name": name, "kind": e.get("kind", "program"),
                "created": e.get("created"), "revoked": e.get("revoked"),
            })
        return rows

    # -- writing ------------------------------------------------------------

    def _write(self, entries: dict[str, dict]) -> None:
        """Replace the key file atomically; it is created with mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "entries": entries}, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._stamp = None

    def add(self, name: str, kind: str = "program", replace: bool = False) -> str:
        """Create credentials for *name* and return the new secret (shown once).

        An active entry is replaced only with *replace*; a revoked one may be
        re-issued freely.
        """
        if not valid_name(name):
            raise ValueError(f"invalid name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        secret = new_secret()
        record = hash_secret(secret)
        if kind == "program":  # the dispatcher's challenge-response keys (no secret-equivalent)
            record["dispatch"] = handshake.make_record(secret)
        with self._lock:
            entries = dict(self._load())
            old = entries.get(name)
            if old and not old.get("revoked") and not replace:
                raise ValueError(f"{name} already has active credentials (revoke it or use --replace)")
            entries[name] = {"kind": kind, "created": time.time(), "revoked": None, **record}
            self._write(entries)
        return secret

    def revoke(self, name: str) -> bool:
        """Revoke *name*'s credentials (the hash is erased); False if there were none."""
        with self._lock:
            entries = dict(self._load())
            e = entries.get(name)
            if not e or e.get("revoked"):
                return False
            entries[name] = {"kind": e.get("kind", "program"), "created": e.get("created"),
                             "revoked": time.time()}
            self._write(entries)
        return True

    # -- checking -----------------------------------------------------------

    def dispatch_record(self, name: str) -> dict | None:
        """The dispatcher handshake record (StoredKey, ServerKey) of an active program, or None.

        Programs added before the dispatcher handshake existed have none:
        ``minard keys add NAME --replace`` issues a new token that has one.
        """
        with self._lock:
            entry = self._load().get(name)
        if not entry or entry.get("revoked") or entry.get("kind", "program") != "program":
            return None
        record = entry.get("dispatch")
        return dict(record) if isinstance(record, dict) else None


    def verify(self, name: str, secret: str | None, kind: str | None = None) -> bool:
        """True if *secret* is the active credential of *name* (of *kind* if given)."""
        if not name or not secret or not isinstance(secret, str) or len(secret) > 1024:
            return False
        with self._lock:
            entry = self._load().get(name)
            remembered = self._verified.get(name)
        if not entry or entry.get("revoked") or (kind and entry.get("kind", "program") != kind):
            # The same scrypt work as a wrong secret: the answer time must not tell
            # whether the name exists (measured 37 ms vs 1.4 ms before).
            check_secret(secret, _DUMMY)
            return False
        tag = hmac.new(self._cache_key, f"{name}\0{secret}".encode(), hashlib.sha256).digest()
        if remembered is not None and hmac.compare_digest(remembered, tag):
            return True
        if not check_secret(secret, entry):
            return False
        with self._lock:
            if self._load().get(name) is entry:  # not revoked meanwhile
                self._verified[name] = tag
        return True


# -- command line -------------------------------------------------------------


def _store(cfg) -> KeyStore:
    """The key store named by the configuration (``keys_file``)."""
    return KeyStore.from_config(cfg)


def _when(ts: float | None) -> str:
    """A timestamp as local ISO time, or '-'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


#: Subcommands that live with their concept and are imported only when run (as the
#: table of :mod:`minard.cli`): the ZMQ keys belong to the data plane.
LAZY_COMMANDS = {"zmq": "minard.pipeline.curve:zmq_keys_cmd"}


class _KeysGroup(click.Group):
    """The ``keys`` group, with the subcommands of :data:`LAZY_COMMANDS` imported on use."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, _, attr = LAZY_COMMANDS[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group("keys", cls=_KeysGroup)
def keys_cli():
    """Add, list and revoke program tokens and shift-crew logins.

    Secrets are stored only as salted scrypt hashes in keys_file (mode 0600);
    a new secret is printed once and cannot be shown again.
    """


@keys_cli.command("add")
@click.argument("name")
@click.option("--user", is_flag=True, help="A shift-crew login for the website instead of a program token.")
@click.option("--replace", is_flag=True, help="Replace active credentials of NAME.")
@pass_config
def add_cmd(cfg, name, user, replace):
    """Create credentials for NAME and print the secret once."""
    store = _store(cfg)
    try:
        secret = store.add(name, kind="user" if user else "program", replace=replace)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    what = "password" if user else "token"
    click.echo(f"{'user' if user else 'program'} {name}: new {what} (shown once, store it now):", err=True)
    click.echo(secret)


@keys_cli.command("list")
@pass_config
def list_cmd(cfg):
    """List credentials (names, kinds, dates; never secrets or hashes)."""
    rows = _store(cfg).listing()
    if not rows:
        click.echo("no credentials", err=True)
        return
    click.echo(f"{'NAME':<28} {'KIND':<8} {'CREATED':<20} STATE")
    for r in rows:
        state = f"revoked {_when(r['revoked'])}" if r["revoked"] else "active"
        click.echo(f"{r['name']:<28} {r['kind']:<8} {_when(r['created']):<20} {state}")


@keys_cli.command("revoke")
@click.argument("name")
@pass_config
def revoke_cmd(cfg, name):
    """Revoke NAME's credentials at once (running servers notice on the next request)."""
    if not _store(cfg).revoke(name):
        raise click.ClickException(f"{name} has no active credentials")
    click.echo(f"revoked {name}")

