"""`minard runs sign|registry|type|reference` and `minard channels` as real subprocesses
against a real Redis, with the credentials of `minard keys`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minard.ops.keys import KeyStore
from minard.store import channel_status as channels
from minard.store import dq as store_dq
from minard.store import registry


@pytest.fixture
def env(redis_url, tmp_path):
    var = tmp_path / "var"
    keys = KeyStore(var / "keys.json")
    pw = {name: keys.add(name, kind="user") for name in ("sam", "eve")}
    keys.add("robot")  # a program token is not a login
    base = {**os.environ, "MINARD_REDIS_URL": redis_url, "MINARD_VAR_DIR": str(var), "MINARD_DQ_EXPERTS": "eve"}
    return {"base": base, "pw": pw}


def minard(env, user, *args):
    e = {**env["base"], "MINARD_USER": user, "MINARD_PASSWORD": env["pw"].get(user, "wrong")}
    return subprocess.run([sys.executable, "-m", "minard.cli", *args], env=e, capture_output=True, text=True,
                          timeout=60, check=False)


def test_runs_sign_follows_the_registry_rules_and_records_who(env, redis_client):
    assert minard(env, "sam", "runs", "sign", "12", "--state", "good", "--comment", "fine").returncode == 0
    refused = minard(env, "sam", "runs", "sign", "12", "--state", "pass", "--comment", "me too")
    assert refused.returncode == 1 and "only an expert" in refused.stderr
    assert minard(env, "eve", "runs", "sign", "12", "--state", "pass", "--comment", "signed").returncode == 0
    wrong = minard(env, "mallory", "runs", "sign", "12", "--state", "bad", "--comment", "x")
    assert wrong.returncode == 1 and "wrong user name or password" in wrong.stderr
    robot = minard({**env, "pw": {"robot": "x"}}, "robot", "runs", "sign", "12", "--state", "bad", "--comment", "x")
    assert robot.returncode == 1
    out = json.loads(minard(env, "sam", "runs", "registry", "12", "--json").stdout)
    assert out["state"] == "pass" and [h["who"] for h in out["history"]] == ["sam", "eve"]
    assert env["pw"]["sam"] not in minard(env, "sam", "runs", "registry", "12").stdout
    assert registry.golden(redis_client)[0]["run"] == 12


def test_run_type_and_expert_reference(env, redis_client):
    assert minard(env, "sam", "runs", "type", "12", "calibration").returncode == 0
    assert store_dq.run_type(redis_client, 12) == "calibration"
    assert minard(env, "sam", "runs", "reference", "calibration", "11").returncode == 1  # not an expert
    assert minard(env, "eve", "runs", "reference", "calibration", "11").returncode == 0
    assert store_dq.references(redis_client) == {"calibration": 11}


def test_channels_flag_unflag_show(env, redis_client):
    assert minard(env, "sam", "channels", "flag", "1234", "screamer", "--reason", "50 kHz").returncode == 0
    assert minard(env, "sam", "channels", "flag", "1234", "no_n100", "--reason", "trigger sum").returncode == 0
    assert minard(env, "sam", "channels", "flag", "10240", "dead", "--reason", "x").returncode == 2
    assert minard(env, "sam", "channels", "flag", "1", "sparkly", "--reason", "x").returncode == 2
    assert minard(env, "sam", "channels", "unflag", "1234", "screamer", "--reason", "fixed").returncode == 0
    shown = json.loads(minard(env, "sam", "channels", "show", "--json").stdout)
    assert set(shown) == {"1234"} and set(shown["1234"]) == {"no_n100"} and shown["1234"]["no_n100"]["who"] == "sam"
    history = json.loads(minard(env, "sam", "channels", "show", "--json", "--history").stdout)
    assert [h["action"] for h in history] == ["flag", "flag", "unflag"]
    assert "1234" in minard(env, "sam", "channels", "show").stdout
    assert channels.flagged(redis_client) == {1234}
