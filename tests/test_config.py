"""The one configuration path: defaults < file < environment < caller's dict."""

from pathlib import Path

import pytest

from minard import config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_file_environment_and_overrides_apply_in_order(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[redis]\nurl = redis://file:1/0\n[dispatcher]\nport = 7100\nhost = filehost\n")
    cfg = config.load({"dispatcher_host": "override"}, path=conf,
                      env={"MINARD_DISPATCHER_PORT": "7200"})
    assert cfg["redis_url"] == "redis://file:1/0"
    assert cfg["dispatcher_port"] == 7200 and isinstance(cfg["dispatcher_port"], int)
    assert cfg["dispatcher_host"] == "override"
    assert cfg["orca_port"] == config.DEFAULTS["orca_port"]


def test_minard_config_names_the_file(tmp_path):
    conf = tmp_path / "other.conf"
    conf.write_text("[orca]\nport = 45000\n")
    assert config.load(env={"MINARD_CONFIG": str(conf)})["orca_port"] == 45000


def test_a_value_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(ValueError, match="dispatcher_port.*not a valid int"):
        config.load(env={"MINARD_DISPATCHER_PORT": "seven"})


def test_a_named_file_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        config.load(path=tmp_path / "nope.conf")


def test_the_shipped_file_parses_and_only_sets_known_keys():
    cfg = config.load(env={})
    assert set(cfg) == set(config.DEFAULTS)


def test_every_key_is_documented():
    text = DOC.read_text()
    missing = [k for k in config.DEFAULTS if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_redact_hides_the_password_of_a_url():
    assert config.redact("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert config.redact("redis://user:pw@host/1") == "redis://user:***@host/1"
    assert config.redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
