"""The command line: one root with --config/--log-level, the configuration passed down as ctx.obj."""

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from minard import cli, config

PACKAGE = Path(cli.__file__).resolve().parent
BIN = Path(sys.executable).parent


def _sources():
    return {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


def test_the_global_options_are_declared_once_in_the_package():
    for option in ('"--config"', '"--log-level"'):
        found = [str(p.relative_to(PACKAGE)) for p, text in _sources().items() for _ in re.finditer(option, text)]
        assert found == ["cli.py"], f"{option} declared in {found}"


def test_no_module_loads_the_configuration_outside_the_root_and_the_app_factories():
    callers = sorted(str(p.relative_to(PACKAGE)) for p, text in _sources().items()
                     if p.name != "config.py" and re.search(r"\bconfig(_mod)?\.load\(", text))
    # cli.py (the root command), the gunicorn config and the two app factories, stack.py's
    # production reference files, web/openapi.py's document generator (python -m), and the
    # dispatcher client for an ad-hoc client given no configuration (processes pass theirs).
    assert set(callers) <= {"cli.py", "gunicorn_conf.py", "ops/logserver.py", "stack.py", "web/__init__.py",
                            "web/openapi.py", "dispatcher/client.py"}, callers
    assert "cli.py" in callers


def test_no_module_writes_into_a_configuration():
    writes = [f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p, text in _sources().items() if p.name != "config.py"
              for m in re.finditer(r"(?<![\w.])(?:cfg|config)\[[^\]]+\]\s*=(?!=)|\bcfg\.(?:update|setdefault|pop)\(", text)]
    assert not writes


def test_no_module_builds_its_own_redis_client():
    # minard/testing/ starts and reaches test servers (namespaces, Sentinels) directly.
    builders = [str(p.relative_to(PACKAGE)) for p, text in _sources().items()
                if re.search(r"Redis\.from_url|Redis\(|StrictRedis|ConnectionPool\(", text)
                and p.relative_to(PACKAGE).parts[0] != "testing"]
    assert builders == ["store/connection.py"]


def _walk(group: click.Group, ctx: click.Context, path: list[str]):
    """Every (path, command) under *group*."""
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield [*path, name], cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, click.Context(cmd, parent=ctx, info_name=name), [*path, name])


def _roots():
    yield "minard", cli.main
    yield "minard_dispatch", cli.dispatch_group()
    yield "data_producer", cli.seed_command(cli.DATA_PRODUCER)
    yield "data_consumer", cli.seed_command(cli.DATA_CONSUMER)


def test_every_command_and_subcommand_has_a_working_help():
    runner = CliRunner()
    seen = 0
    for name, root in _roots():
        paths = [[]]
        if isinstance(root, click.Group):
            paths += [p for p, _ in _walk(root, click.Context(root, info_name=name), [])]
        for path in paths:
            result = runner.invoke(root, [*path, "--help"], prog_name=name, env={"MINARD_CONFIG": "/nonexistent"})
            assert result.exit_code == 0, f"{name} {' '.join(path)} --help: {result.output}"
            assert "Usage:" in result.output
            seen += 1
    assert seen >= len(cli.COMMANDS) + 6


def test_every_program_takes_the_global_options_before_its_own():
    for name, root in _roots():
        result = CliRunner().invoke(root, ["--help"], prog_name=name)
        assert "--config FILE" in result.output and "--log-level" in result.output, name


def test_the_root_loads_the_named_file_once_and_passes_it_down(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[dispatcher]\nport = 7345\n")
    seen = []

    @click.command("probe")
    @config.pass_config
    def probe(cfg):
        seen.append(cfg)

    group = click.Group("root", params=cli.global_params(), callback=cli._root_callback, commands=[probe])
    result = CliRunner().invoke(group, ["--config", str(conf), "--log-level", "debug", "probe"])
    assert result.exit_code == 0, result.output
    [cfg] = seen
    assert isinstance(cfg, config.Config)
    assert cfg["dispatcher_port"] == 7345 and cfg["log_level"] == "DEBUG"


def test_a_bad_configuration_is_a_one_line_error_not_a_traceback(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[dispatcher]\nport = seven\n")
    result = CliRunner().invoke(cli.main, ["--config", str(conf), "runs"])
    assert result.exit_code == 1
    assert "configuration:" in result.output and "dispatcher_port" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("argv", [
    ["minard_dispatch", "--config", "{conf}", "--log-level", "WARNING", "pull", "--help"],
    ["data_producer", "--config", "{conf}", "--help"],
    ["data_consumer", "--config", "{conf}", "--log-level", "debug", "5557", "--help"],
    ["minard", "--config", "{conf}", "dispatcher", "--help"],
])
def test_the_installed_programs_accept_the_global_options(argv, tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[redis]\nurl = redis://127.0.0.1:1/0\n")
    proc = subprocess.run([str(BIN / argv[0]), *[a.format(conf=conf) for a in argv[1:]]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_a_seed_program_reads_the_named_configuration(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[zmq]\ncmos = tcp://127.0.0.1:6557\nbase = tcp://127.0.0.1:6558\n")
    proc = subprocess.run([str(BIN / "data_consumer"), "--config", str(conf), "5557"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "6557 (cmos), 6558 (base)" in proc.stderr
