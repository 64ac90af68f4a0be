"""CURVE encryption and authentication of every ZMQ PUSH/PULL link (``zmq.auth``).

Every producer's PUSH socket is a CURVE *server* (it binds) and every
consumer pool's PULL socket a CURVE *client* (it connects).  A link is
encrypted, and the producer accepts only consumers whose public key is in
its ``authorized/`` directory (a ZAP handler, :class:`zmq.auth.thread.ThreadAuthenticator`):
a PULL that lacks the server's public key, or whose own key is not
authorized, completes no handshake and receives nothing.

Keys live in one directory, ``zmq_keys_dir`` (default ``<var_dir>/zmq_keys``),
mode 0700, every file 0600, in the format of :func:`zmq.auth.create_certificates`::

    server.key, server.key_secret   the producers' key pair
    client.key, client.key_secret   the consumers' key pair
    authorized/<name>.key           public keys of the consumers allowed to connect

``minard keys zmq`` and ``minard up`` create them; a producer or consumer
that finds none creates them itself, atomically, so processes of one host
agree.  A consumer on another host needs ``server.key`` and a client key pair
whose public half is in the producer's ``authorized/`` (``minard keys zmq
--client NAME`` makes one).  Plain TCP is used only with ``zmq_insecure =
true`` (``MINARD_ZMQ_INSECURE``), logged as a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import click
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from minard import config as config_mod

log = logging.getLogger("minard.pipeline.curve")

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"
_AUTHENTICATORS: dict[int, ThreadAuthenticator] = {}  # one ZAP handler per context


def insecure(cfg) -> bool:
    """True when the configuration asks for plain TCP (``zmq_insecure``)."""
    value = cfg.get("zmq_insecure", False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def keys_dir(cfg) -> Path:
    """The key directory: ``zmq_keys_dir``, or ``<var_dir>/zmq_keys``; relative paths from the checkout."""
    raw = str(cfg.get("zmq_keys_dir") or "")
    path = Path(raw) if raw else Path(str(cfg.get("var_dir") or "var")) / "zmq_keys"
    return path if path.is_absolute() else config_mod.ROOT / path


def _private(directory: Path) -> None:
    """Mode 0700 on *directory* and its subdirectories, 0600 on every file."""
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


def _generate(directory: Path, client: str) -> None:
    """The server pair, the client pair *client* and its authorization, in *directory*."""
    if not (directory / f"{SERVER}.key_secret").exists():
        zmq.auth.create_certificates(str(directory), SERVER)
    if not (directory / f"{client}.key_secret").exists():
        zmq.auth.create_certificates(str(directory), client)
    (directory / AUTHORIZED).mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(directory / f"{client}.key", directory / AUTHORIZED / f"{client}.key")
    _private(directory)


def ensure_keys(directory: Path) -> Path:
    """Create the key directory (server and client pairs, the client authorized) if missing.

    Built in a private temporary directory and renamed into place, so that
    processes starting together agree on one set of keys.
    """
    directory = Path(directory)
    if (directory / f"{SERVER}.key_secret").exists() and (directory / f"{CLIENT}.key_secret").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".zmq-keys-", dir=directory.parent))
    try:
        _generate(tmp, CLIENT)
        os.rename(tmp, directory)  # atomic; fails if another process created it first
        log.warning("generated new ZMQ CURVE keys in %s (consumers on other hosts need server.key "
                    "and an authorized client key: minard keys zmq --client NAME)", directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / f"{SERVER}.key_secret").exists() or not (directory / f"{CLIENT}.key_secret").exists():
            _generate(directory, CLIENT)  # a directory that existed without keys
    return directory


def add_client(directory: Path, name: str) -> tuple[Path, Path]:
    """A new client key pair *name*, authorized; returns (public, secret) paths."""
    directory = ensure_keys(directory)
    _generate(directory, name)
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def revoke_client(directory: Path, name: str) -> bool:
    """Remove client *name* from the authorized keys (producers reload at restart)."""
    path = Path(directory) / AUTHORIZED / f"{name}.key"
    if not path.exists():
        return False
    path.unlink()
    return True


def secure_server(sock: zmq.Socket, cfg, ctx: zmq.Context) -> None:
    """Make a producer's PUSH socket a CURVE server that accepts authorized consumers only.

    Call before ``bind``.  With ``zmq_insecure`` the socket stays plain (warned).
    """
    if insecure(cfg):
        log.warning("zmq_insecure = true: this producer's ZMQ link is plain TCP, unauthenticated "
                    "and unencrypted")
        return
    directory = ensure_keys(keys_dir(cfg))
    auth = _AUTHENTICATORS.get(id(ctx))
    if auth is None or not auth.is_alive():
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("minard.pipeline.curve.zap"))
        auth.start()
        _AUTHENTICATORS[id(ctx)] = auth
    auth.configure_curve(domain="*", location=str(directory / AUTHORIZED))
    public, secret = zmq.auth.load_certificate(str(directory / f"{SERVER}.key_secret"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, cfg, client: str = CLIENT) -> None:
    """Make a consumer's PULL socket a CURVE client of the producers (call before ``connect``)."""
    if insecure(cfg):
        log.warning("zmq_insecure = true: this consumer's ZMQ link is plain TCP, unauthenticated "
                    "and unencrypted")
        return
    directory = ensure_keys(keys_dir(cfg))
    server_public, _ = zmq.auth.load_certificate(str(directory / f"{SERVER}.key"))
    public, secret = zmq.auth.load_certificate(str(directory / f"{client}.key_secret"))
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the ZAP handler of *ctx*, if one was started (at producer shutdown)."""
    auth = _AUTHENTICATORS.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


@click.command("zmq")
@click.option("--client", "client", default=None, metavar="NAME",
              help="Also make an authorized client key pair NAME (for a consumer on another host).")
@click.option("--revoke", "revoke", default=None, metavar="NAME", help="Remove client NAME from the authorized keys.")
@config_mod.pass_config
def zmq_keys_cmd(cfg, client, revoke):
    """Create the ZMQ CURVE keys of the data plane (zmq_keys_dir), files 0600.

    Makes the producers' server pair and the consumers' client pair if they are
    missing (existing keys are kept); --client adds another authorized client,
    --revoke removes one (producers read the authorized keys when they start).
    """
    directory = keys_dir(cfg)
    if revoke:
        if not revoke_client(directory, revoke):
            raise click.ClickException(f"{revoke} is not an authorized ZMQ client")
        click.echo(f"revoked ZMQ client {revoke}; restart the producers")
        return
    ensure_keys(directory)
    click.echo(f"ZMQ CURVE keys in {directory}: server.key (give it to consumers), server.key_secret "
               f"(producers only), client.key_secret (consumers), authorized/ (clients producers accept)")
    if client:
        public, secret = add_client(directory, client)
        click.echo(f"client {client}: {secret} (copy to the consumer's host with server.key; set "
                   f"zmq_keys_dir there and name it client.key_secret) and {public} (authorized)")

