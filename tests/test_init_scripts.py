"""The LSB init scripts of deploy/init.d against a temporary prefix on free ports.

Each script is run for real (bash): start prints what it starts and waits for
its port, status reports it (LSB codes), a second start says it already runs,
stop really stops it (by pid) and says so; a process that ignores SIGTERM is
killed after STOP_TIMEOUT.  Every process is stopped by pid in the end.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minard import config
from minard import stack as stack_mod
from minard.config import ROOT
from minard.testing import free_port

pytestmark = pytest.mark.timeout(120)

INIT = ROOT / "deploy" / "init.d"
VENV = Path(sys.executable).parent.parent


@pytest.fixture
def prefix(tmp_path):
    """A defaults file and rendered configurations under *tmp_path*, all on free ports."""
    run, logs = tmp_path / "run", tmp_path / "log"
    ports = {k: free_port() for k in ("redis", "nginx", "web", "log")}
    cfg = config.load({"redis_url": f"redis://127.0.0.1:{ports['redis']}/0", "nginx_port": ports["nginx"],
                       "web_port": ports["web"], "log_port": ports["log"], "var_dir": str(tmp_path / "var")},
                      env={})
    lay = stack_mod.Layout(tmp_path / "stack")
    for d in (lay.run, lay.logs, lay.redis, lay.nginx, lay.secrets):
        d.mkdir(parents=True)
    stack_mod.write_private(lay.redis_auth, "requirepass test-password\n")
    lay.redis_conf.write_text(stack_mod.redis_text(cfg, lay))
    lay.nginx_conf.write_text(stack_mod.nginx_text(cfg, lay))
    conf = tmp_path / "minard.conf"
    stack_mod.write_private(conf, stack_mod.config_text(cfg))
    sock = run / "supervisor.sock"
    sup = tmp_path / "supervisord.conf"
    sup.write_text(f"""[unix_http_server]
file={sock}
chmod=0700
[supervisord]
logfile={logs}/supervisord.log
pidfile={run}/supervisord.pid
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:sleeper]
command=sleep 600
""")
    defaults = tmp_path / "default-minard"
    defaults.write_text(f"""MINARD_HOME={ROOT}
MINARD_VENV={VENV}
MINARD_USER={getpass.getuser()}
MINARD_CONFIG={conf}
MINARD_RUN_DIR={run}
MINARD_LOG_DIR={logs}
REDIS_PORT={ports['redis']}
REDIS_SERVER={stack_mod.binary('redis-server')}
REDIS_CONF={lay.redis_conf}
NGINX={stack_mod.binary('nginx')}
NGINX_CONF={lay.nginx_conf}
NGINX_PREFIX={lay.nginx}
NGINX_PORT={ports['nginx']}
WEB_PORT={ports['web']}
LOG_PORT={ports['log']}
SUPERVISORD_CONF={sup}
SUPERVISOR_SOCKET={sock}
""")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MINARD_")},
           "MINARD_DEFAULTS": str(defaults), "MINARD_INIT_FUNCTIONS": str(INIT / "minard-functions")}
    started: list[Path] = []
    yield {"env": env, "run": run, "ports": ports, "started": started, "logs": logs}
    for pidfile in run.glob("minard-*.pid"):  # whatever a failing test left running
        try:
            pid = int(pidfile.read_text())
            os.killpg(pid, signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def run_script(prefix, name: str, action: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INIT / name), action], env={**prefix["env"], **extra},
                          capture_output=True, text=True, timeout=90, check=False)


SCRIPTS = [
    ("minard-redis", "redis", "redis", "redis-server"),
    ("minard-web", "gunicorn", "web", "gunicorn"),
    ("minard-log", "gunicorn (logging server)", "log", "gunicorn"),
    ("minard-nginx", "nginx", "nginx", "nginx"),
    ("minard-supervisord", "supervisord", None, "supervisord"),
]


@pytest.mark.parametrize("script,name,port,binary", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_start_status_stop(prefix, script, name, port, binary):
    out = run_script(prefix, script, "start")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Starting {name}: " in out.stdout and binary in out.stdout
    where = f"port {prefix['ports'][port]}" if port else "socket "
    assert f"{name} is running (pid " in out.stdout and where in out.stdout
    pid = int((prefix["run"] / f"{script}.pid").read_text())
    assert stack_mod.pid_alive(pid)

    st = run_script(prefix, script, "status")
    assert st.returncode == 0 and f"{name} is running (pid {pid}), listening on" in st.stdout

    again = run_script(prefix, script, "start")
    assert again.returncode == 0 and f"{name} is already running (pid {pid})" in again.stdout

    restart = run_script(prefix, script, "restart")
    assert restart.returncode == 0 and "stopped." in restart.stdout and "listening on" in restart.stdout
    new_pid = int((prefix["run"] / f"{script}.pid").read_text())
    assert new_pid != pid and not stack_mod.pid_alive(pid)

    begun = time.monotonic()
    stop = run_script(prefix, script, "stop")  # right after the start: its workers may still be booting
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # A stop signal lost while a worker booted made gunicorn wait its 10 s graceful timeout.
    assert time.monotonic() - begun < 5, "the stop waited for a worker that missed its SIGTERM"
    assert f"Stopping {name} (pid {new_pid})" in stop.stdout and f"{name} stopped." in stop.stdout
    assert not stack_mod.pid_alive(new_pid)
    assert stack_mod.group_pids(new_pid) == []  # its children (workers) too

    st = run_script(prefix, script, "status")
    assert st.returncode == 3 and "is not running" in st.stdout
    assert "is not running" in run_script(prefix, script, "stop").stdout


def test_stop_kills_a_process_that_ignores_sigterm(prefix):
    out = run_script(prefix, "minard-redis", "start")
    assert out.returncode == 0, out.stdout + out.stderr
    pid = int((prefix["run"] / "minard-redis.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    stop = run_script(prefix, "minard-redis", "stop", STOP_TIMEOUT="1")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "did not stop within 1s: killing it" in stop.stdout and "redis stopped." in stop.stdout
    assert not stack_mod.pid_alive(pid)


def test_start_fails_clearly_when_the_port_is_taken(prefix):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", prefix["ports"]["web"]))
        s.listen()
        out = run_script(prefix, "minard-web", "start")
    assert out.returncode == 1 and "already in use" in out.stderr
    assert not (prefix["run"] / "minard-web.pid").exists()


def test_usage(prefix):
    out = run_script(prefix, "minard-nginx", "bogus")
    assert out.returncode == 2 and "Usage:" in out.stderr


def test_production_reference_configs_are_the_rendered_templates():
    """conf/{redis,nginx,supervisord}.conf = the templates for the default ports and paths
    (regenerate with: python -m minard.stack render-production)."""
    for name, text in stack_mod.production_files().items():
        assert (ROOT / "conf" / name).read_text() == text, name
    sup = (ROOT / "conf" / "supervisord.conf").read_text()
    assert "[program:redis]" not in sup and "[program:minard_dispatch_pull]" in sup
    assert "listen 0.0.0.0:50000;" in (ROOT / "conf" / "nginx.conf").read_text()
