"""A real supervisord on a private unix socket, with one sleeping program (tests)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from minard.testing import stop_pid, wait_for

CONF = """\
[unix_http_server]
file = {sock}
chmod = 0700
[supervisord]
nodaemon = true
logfile = {work}/supervisord.log
pidfile = {work}/supervisord.pid
childlogdir = {work}
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:sleeper]
command = /bin/sleep 600
startsecs = 0
"""


@contextlib.contextmanager
def supervisord():
    """Start supervisord with program ``sleeper``; yield its socket path; stop it by pid."""
    work = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))  # short: unix socket paths are limited
    sock = work / "s.sock"
    (work / "supervisord.conf").write_text(CONF.format(sock=sock, work=work))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "supervisord"), "-c", str(work / "supervisord.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 20, "supervisord's socket")
        yield sock
    finally:
        stop_pid(proc)
        shutil.rmtree(work, ignore_errors=True)
