"""The dispatcher's challenge-response handshake (pure; docs/protocol.md section 2.1).

A SCRAM-style exchange (RFC 5802 with scrypt as the key derivation and
HMAC-SHA256): the program's secret never crosses the wire, the dispatcher
stores only ``StoredKey`` and ``ServerKey`` (a stolen key file does not let
anyone log in) and runs no scrypt itself, so an unauthenticated client
cannot make it burn CPU.

    SaltedKey       = scrypt(secret, salt, n, r, p, dklen=32)
    ClientKey       = HMAC(SaltedKey, "Client Key")
    StoredKey       = SHA256(ClientKey)
    ServerKey       = HMAC(SaltedKey, "Server Key")
    AuthMessage     = HELLO payload "\\n" server nonce (hex) "\\n" client nonce (hex)
    ClientProof     = ClientKey XOR HMAC(StoredKey, AuthMessage)
    ServerSignature = HMAC(ServerKey, AuthMessage)

The dispatcher recovers ``ClientKey`` = proof XOR HMAC(StoredKey, AuthMessage)
and accepts when SHA256 of it equals ``StoredKey``; the client checks
``ServerSignature`` (mutual authentication).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets

#: Name of the mechanism, the first field of a challenge.
MECHANISM = "scrypt-sha256"
#: scrypt cost of the dispatcher key: 1 MiB, a few ms per connection (cached per
#: process).  Program tokens are 256 random bits, so a slow hash would add no
#: resistance to guessing; the cost only has to keep the derivation one-way.
SCRYPT = {"n": 2**10, "r": 8, "p": 1}
NONCE_BYTES = 16
#: Largest handshake frame (HELLO or AUTH) a connection may send before it is authenticated.
MAX_HANDSHAKE_FRAME = 512
_HEX = re.compile(r"[0-9a-f]+")


class HandshakeError(ValueError):
    """A challenge or a response that does not parse."""


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@functools.lru_cache(maxsize=16)
def salted_key(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt of *secret* (cached: a reconnecting client derives it once)."""
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=32)


def client_key(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """ClientKey of *secret* under these scrypt parameters."""
    return _hmac(salted_key(secret, salt, n, r, p), b"Client Key")


def make_record(secret: str, salt: bytes | None = None, params: dict | None = None) -> dict:
    """What the key file stores for the dispatcher: salt, cost, StoredKey, ServerKey (hex)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    params = dict(SCRYPT if params is None else params)
    salted = salted_key(secret, salt, params["n"], params["r"], params["p"])
    return {"mechanism": MECHANISM, "salt": salt.hex(), **params,
            "stored_key": hashlib.sha256(_hmac(salted, b"Client Key")).hexdigest(),
            "server_key": _hmac(salted, b"Server Key").hex()}


def new_nonce() -> str:
    """A fresh random nonce (hex)."""
    return secrets.token_hex(NONCE_BYTES)


def auth_message(hello: str, server_nonce: str, client_nonce: str) -> bytes:
    """The bytes both sides sign: binds the proof to this HELLO and both nonces."""
    return f"{hello}\n{server_nonce}\n{client_nonce}".encode()


def challenge(nonce: str, record: dict) -> str:
    """The server's AUTH payload: ``scrypt-sha256:nonce:salt:n:r:p``."""
    return f"{MECHANISM}:{nonce}:{record['salt']}:{record['n']}:{record['r']}:{record['p']}"


def parse_challenge(text: str) -> tuple[str, bytes, int, int, int]:
    """(nonce, salt, n, r, p) of a challenge; HandshakeError if malformed or too costly."""
    parts = text.split(":")
    if len(parts) != 6 or parts[0] != MECHANISM:
        raise HandshakeError(f"unknown challenge {text[:60]!r}")
    nonce, salt_hex, *cost = parts[1:]
    if not (_HEX.fullmatch(nonce) and _HEX.fullmatch(salt_hex)) or not all(c.isdigit() for c in cost):
        raise HandshakeError(f"malformed challenge {text[:60]!r}")
    n, r, p = (int(c) for c in cost)
    # A fake dispatcher must not make the client allocate gigabytes.
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 4:
        raise HandshakeError(f"scrypt cost out of range in {text[:60]!r}")
    return nonce, bytes.fromhex(salt_hex), n, r, p


def respond(secret: str, hello: str, challenge_text: str) -> tuple[str, bytes]:
    """The client's AUTH payload ``client_nonce:proof`` and the ServerSignature it expects."""
    nonce, salt, n, r, p = parse_challenge(challenge_text)
    salted = salted_key(secret, salt, n, r, p)
    ckey = _hmac(salted, b"Client Key")
    stored = hashlib.sha256(ckey).digest()
    cnonce = new_nonce()
    msg = auth_message(hello, nonce, cnonce)
    proof = bytes(a ^ b for a, b in zip(ckey, _hmac(stored, msg)))
    return f"{cnonce}:{proof.hex()}", _hmac(_hmac(salted, b"Server Key"), msg)


def parse_response(text: str) -> tuple[str, bytes]:
    """(client nonce, proof) of an AUTH response; HandshakeError if malformed."""
    cnonce, sep, proof = text.partition(":")
    if (not sep or len(cnonce) != 2 * NONCE_BYTES or len(proof) != 64
            or not (_HEX.fullmatch(cnonce) and _HEX.fullmatch(proof))):
        raise HandshakeError("malformed AUTH response (want client_nonce:proof in hex)")
    return cnonce, bytes.fromhex(proof)


def verify(record: dict, hello: str, server_nonce: str, response: str) -> bytes | None:
    """The ServerSignature if *response* proves knowledge of the secret, else None."""
    try:
        cnonce, proof = parse_response(response)
        stored = bytes.fromhex(record["stored_key"])
        server_key = bytes.fromhex(record["server_key"])
    except (HandshakeError, KeyError, ValueError, TypeError):
        return None
    msg = auth_message(hello, server_nonce, cnonce)
    ckey = bytes(a ^ b for a, b in zip(proof, _hmac(stored, msg)))
    if not hmac.compare_digest(hashlib.sha256(ckey).digest(), stored):
        return None
    return _hmac(server_key, msg)
