"""Credentials: salted hashes only, 0600 file, revocation, and the `minard keys` CLI."""

from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner

from minard.ops import keys
from minard.ops.keys import KeyStore


@pytest.fixture
def store(tmp_path):
    return KeyStore(tmp_path / "var" / "keys.json")


def test_added_token_verifies_and_only_a_salted_hash_is_stored(store):
    token = store.add("data_producer")
    assert token.startswith(keys.TOKEN_PREFIX) and len(token) > 40
    assert store.verify("data_producer", token)
    text = store.path.read_text()
    assert token not in text and token[len(keys.TOKEN_PREFIX):] not in text
    entry = json.loads(text)["entries"]["data_producer"]
    assert entry["algo"] == "scrypt" and len(bytes.fromhex(entry["salt"])) == 16


def test_key_file_is_created_with_mode_0600(store):
    store.add("pinger")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_same_secret_hashes_differently_each_time():
    a, b = keys.hash_secret("same"), keys.hash_secret("same")
    assert a["hash"] != b["hash"] and a["salt"] != b["salt"]
    assert keys.check_secret("same", a) and not keys.check_secret("other", a)


def test_wrong_token_and_wrong_name_are_rejected(store):
    token = store.add("a")
    store.add("b")
    assert not store.verify("a", token + "x")
    assert not store.verify("b", token)
    assert not store.verify("nobody", token)
    assert not store.verify("a", "")
    assert not store.verify("a", None)


def test_revoked_token_is_rejected_even_by_another_store_that_verified_it(store):
    token = store.add("dispatcher")
    server_view = KeyStore(store.path)  # e.g. a gunicorn worker with a cached success
    assert server_view.verify("dispatcher", token)
    assert store.revoke("dispatcher")
    assert not server_view.verify("dispatcher", token)
    assert "hash" not in store.entries()["dispatcher"]
    assert not store.revoke("dispatcher")


def test_active_credentials_are_not_replaced_silently(store):
    old = store.add("x")
    with pytest.raises(ValueError, match="already has active"):
        store.add("x")
    new = store.add("x", replace=True)
    assert store.verify("x", new) and not store.verify("x", old)


def test_user_login_is_not_a_program_token(store):
    pw = store.add("alice", kind="user")
    assert store.verify("alice", pw, kind="user")
    assert not store.verify("alice", pw, kind="program")


@pytest.mark.parametrize("name", ["../etc", "/abs", "a/b", "", ".hidden", "a" * 65, "a..b"])
def test_unsafe_names_are_refused(store, name):
    with pytest.raises(ValueError, match="invalid name"):
        store.add(name)


def test_cli_shows_a_new_token_once_and_never_in_list_or_revoke(tmp_path):
    from minard.cli import main

    conf = tmp_path / "minard.conf"
    conf.write_text(f"[keys]\nfile = {tmp_path / 'k.json'}\n")
    runner = CliRunner()
    added = runner.invoke(main, ["-c", str(conf), "keys", "add", "monitors"])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip().splitlines()[-1]
    assert KeyStore(tmp_path / "k.json").verify("monitors", token)

    user = runner.invoke(main, ["-c", str(conf), "keys", "add", "shifter", "--user"])
    assert user.exit_code == 0 and "password" in user.stderr

    listed = runner.invoke(main, ["-c", str(conf), "keys", "list"])
    assert listed.exit_code == 0
    assert "monitors" in listed.output and "shifter" in listed.output and "user" in listed.output
    assert token not in listed.output and "hash" not in listed.output

    revoked = runner.invoke(main, ["-c", str(conf), "keys", "revoke", "monitors"])
    assert revoked.exit_code == 0 and token not in revoked.output
    assert "revoked" in runner.invoke(main, ["-c", str(conf), "keys", "list"]).output
    again = runner.invoke(main, ["-c", str(conf), "keys", "revoke", "monitors"])
    assert again.exit_code != 0 and "no active credentials" in again.output
