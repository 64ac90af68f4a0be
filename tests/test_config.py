"""The one configuration path: defaults < file < environment < caller's dict."""

import ast
import re
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


def test_the_shipped_file_restates_no_default_and_shows_every_key():
    shipped = config.ROOT / "conf" / "minard.conf"
    restated = [k for k, v in config._read_file(shipped).items() if config.coerce(k, v) == config.DEFAULTS[k]]
    assert not restated, f"conf/minard.conf sets {restated} to their defaults"
    text = shipped.read_text()
    template = config.ini_template()
    missing = [line for line in template.splitlines() if line.startswith("# ") and " = " in line
               and line not in text]
    assert not missing, "conf/minard.conf lacks keys: python -m minard.config ini > conf/minard.conf"


def test_every_key_is_documented():
    text = DOC.read_text()
    missing = [k for k in config.DEFAULTS if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_the_documented_types_and_defaults_are_those_of_the_code():
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| (\w+) \| `(.*)` \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), ast.literal_eval(m.group(3)), m.group(4))
    assert set(rows) == set(config.KEYS), "docs/configuration.md lists other keys than minard/config.py"
    for name, key in config.KEYS.items():
        assert rows[name] == (key.type.__name__, key.default, key.doc), name


def test_the_documentation_is_generated_from_the_code():
    assert DOC.read_text() == config.markdown(), \
        "docs/configuration.md is stale: python -m minard.config > docs/configuration.md"


def test_every_value_has_the_type_of_its_key(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[dispatch]\nbatch_ms = 20\n[web]\nsecure_cookies = yes\n")
    cfg = config.load({"stack_replay_rate": 3, "var_dir": tmp_path}, path=conf, env={})
    for name, key in config.KEYS.items():
        assert type(cfg[name]) is key.type, name
    assert cfg["dispatch_batch_ms"] == 20.0 and cfg["web_secure_cookies"] is True
    assert cfg["var_dir"] == str(tmp_path)


def test_an_unknown_key_in_the_file_or_the_callers_dict_is_an_error(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[dispatcher]\nprot = 7100\n")
    with pytest.raises(ValueError, match="m.conf: unknown configuration key 'dispatcher_prot'"):
        config.load(path=conf, env={})
    with pytest.raises(ValueError, match="unknown configuration key 'no_such_key'"):
        config.load({"no_such_key": 1}, env={})


def test_minard_variables_that_name_no_key_are_left_alone():
    cfg = config.load(env={"MINARD_HOME": "/opt/minard", "MINARD_UPDATE_DOCS_IMG": "1"})
    assert "home" not in cfg and "update_docs_img" not in cfg


def test_a_value_of_the_wrong_python_type_is_an_error():
    with pytest.raises(ValueError, match="dispatcher_port"):
        config.load({"dispatcher_port": 7.5}, env={})
    with pytest.raises(ValueError, match="web_secure_cookies"):
        config.load({"web_secure_cookies": "perhaps"}, env={})


def test_the_frame_limits_default_to_the_codecs_own_limits():
    # config imports no codec (gunicorn_conf and metrics may import config), so the two
    # limits are written in both places and kept equal here.
    from minard.formats import framing, wire

    assert config.DEFAULTS["dispatcher_max_frame"] == framing.DEFAULT_MAX_FRAME
    assert config.DEFAULTS["zmq_max_frame"] == wire.MAX_PAYLOAD


def test_every_default_has_the_type_its_key_declares():
    for key in config.KEYS.values():
        assert type(key.default) is key.type and key.doc, key.name


def test_redact_hides_the_password_of_a_url():
    assert config.redact("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert config.redact("redis://user:pw@host/1") == "redis://user:***@host/1"
    assert config.redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_retired_key_in_the_file_loads_with_a_warning_but_an_unknown_key_is_an_error(tmp_path, caplog):
    """An upgrade that retires a key must not stop a deployment whose minard.conf still sets it."""
    path = tmp_path / "minard.conf"
    path.write_text("[web]\nthreads = 8\nport = 8090\n")
    with caplog.at_level("WARNING", logger="minard.config"):
        cfg = config.load(path=path, env={})
    assert cfg["web_port"] == 8090 and "web_threads" not in cfg
    assert "web_threads is no longer used" in caplog.text
    path.write_text("[web]\nthread = 8\n")
    with pytest.raises(ValueError, match="unknown configuration key 'web_thread'"):
        config.load(path=path, env={})
