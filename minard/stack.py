"""``minard up``, ``minard down``, ``minard status``: the whole stack in one command.

``minard up`` runs every process of the monitoring (seed 003's process list)
as an ordinary user under one supervisord, with everything in one local
directory (``stack_dir``, default ``var/stack``)::

    stack/
      supervisord.conf  redis.conf  nginx.conf      rendered from conf/templates/*.in
      prometheus.yml                                scrape configuration of the metrics ports
      minard.conf       programs.cfg                the configuration every process reads (0600)
      secrets/          redis password, pinger tokens, supervisord password (0700 / 0600)
      run/              supervisord's control socket, pid files, the stack id
      logs/             one log file per process (supervisord), nginx, supervisord
      data/             synthetic ZDAB run and ORCA stream (written at first start)
      redis/ nginx/     Redis snapshot, nginx temp files
      var/              var_dir of the processes: keys, web secret, pool event logs

Processes: Redis, the dispatcher, the replay of the bundled and synthetic
runs (loop), the synthetic ORCA stream (``minard orca-replay --loop``), the
producers (``minard_dispatch push``, ``data_producer``), the consumer pools
(``minard_dispatch pull``, ``data_consumer`` 5557/5558), both gunicorn apps,
nginx, the pinger and the monitors.  Secrets reach them only through 0600
files (``MINARD_CONFIG`` names the stack's configuration), never a command
line.  ``minard down`` asks supervisord to shut down, then checks by pid (and
by the stack id every process inherits in its environment) that nothing is
left, killing stragglers.  docs/deploy.md describes it and the production
install.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import click

from minard import config as config_mod
from minard.config import ROOT
from minard.pipeline import curve

TEMPLATES = ROOT / "conf" / "templates"
#: The bundled recorded run, beside the checkout (if present).
DEMO_ZDAB = ROOT.parent / "shared" / "data" / "Demo_Events.zdab"
#: Environment variable every stack process inherits: how ``down`` finds stragglers.
#: (Not MINARD_*, so that minard.config does not read it as a key.)
STACK_ENV = "MINARDSTACK_ID"
SYNTHETIC_RUN = 1000


# ----------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Every path of one stack directory."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        """Sub-directories and files by name (see the module docstring)."""
        paths = {
            "run": "run", "logs": "logs", "data": "data", "secrets": "secrets", "var": "var",
            "redis": "redis", "nginx": "nginx",
            "supervisord_conf": "supervisord.conf", "redis_conf": "redis.conf",
            "nginx_conf": "nginx.conf", "minard_conf": "minard.conf", "programs_cfg": "programs.cfg",
            "prometheus_yml": "prometheus.yml",
            "redis_auth": "secrets/redis-auth.conf", "redis_password": "secrets/redis_password",
            "tokens": "secrets/pinger_tokens.json", "supervisor_password": "secrets/supervisor_password",
            "dispatcher_credentials": "secrets/dispatcher_credentials.json",
            "socket": "run/supervisor.sock", "pidfile": "run/supervisord.pid", "id_file": "run/stack.id",
            "zdab": "data/synthetic_run.zdab", "orca": "data/synthetic_orca.dat",
            "redis_acl": "secrets/redis_acl.json", "tls_cert": "secrets/tls.crt", "tls_key": "secrets/tls.key",
        }
        if name not in paths:
            raise AttributeError(name)
        return self.root / paths[name]


def layout_for(cfg, directory: str | os.PathLike | None = None) -> Layout:
    """The layout of *directory*, or of ``stack_dir`` from the configuration."""
    if directory is None:
        return Layout(cfg.path("stack_dir").resolve())
    return Layout(Path(directory).resolve())


# ----------------------------------------------------------------- rendering


def render(template: str, values: dict[str, object]) -> str:
    """Replace every ``@name@`` in *template*; an unknown name is an error, not a blank."""
    def one(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder @{m.group(1)}@ has no value")
        return str(values[m.group(1)])

    return re.sub(r"@([a-z_]+)@", one, template)


def template(name: str) -> str:
    """The text of ``conf/templates/NAME``."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def write_private(path: Path, text: str) -> None:
    """Write *text* to *path* with mode 0600 (created so; never briefly readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
    os.replace(tmp, path)


def write_public(path: Path, text: str) -> None:
    """Write a file without secrets (mode 0640: the owner and its group), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)


def config_text(cfg: dict) -> str:
    """*cfg* as an INI file that :func:`minard.config.load` reads back to the same keys.

    A flat key ``a_b_c`` is written as ``[a] b_c`` (the loader joins them again).
    """
    sections: dict[str, dict[str, str]] = {}
    for key in sorted(cfg):
        head, sep, rest = key.partition("_")
        if not sep:
            continue  # not a configuration key (cannot come from the file anyway)
        value = cfg[key]
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        sections.setdefault(head, {})[rest] = text
    parser = configparser.ConfigParser(interpolation=None)
    for head, items in sections.items():
        parser[head] = items
    lines = ["# minard configuration of one stack, written by minard up (mode 0600: it holds\n",
             "# the Redis password).  Edit conf/minard.conf and run minard up again instead.\n\n"]
    from io import StringIO

    buf = StringIO()
    parser.write(buf)
    return "".join(lines) + buf.getvalue()


def redis_port(cfg) -> int:
    """The TCP port of ``redis_url``."""
    return urllib.parse.urlsplit(str(cfg["redis_url"])).port or 6379


def zmq_port(endpoint: str) -> int:
    """The port of a ``tcp://host:port`` endpoint."""
    return int(str(endpoint).rsplit(":", 1)[1])


def binary(name: str) -> str:
    """Absolute path of a program: the virtualenv's bin first, then PATH and /usr/sbin."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                        if os.access(f"{d}/{name}", os.X_OK)), None)
    if not found:
        raise click.ClickException(f"{name} is not installed: run ./manage.sh setup")
    return found


# ----------------------------------------------------------------- the processes


@dataclass(frozen=True)
class Program:
    """One supervisord program: its name (as in programs.cfg), order and stop time."""

    name: str
    priority: int
    stopwaitsecs: int = 10


#: Every process of the stack, in start order.
PROGRAMS = (
    Program("redis", 10, 30),
    Program("dispatcher", 20, 20),
    Program("minard_dispatch_pull", 30, 30),
    Program("data_consumer_cmos", 30, 30),
    Program("data_consumer_base", 30, 30),
    Program("minard_dispatch_push", 40, 15),
    Program("data_producer", 40, 15),
    Program("web", 50, 15),
    Program("snoplus_log", 50, 15),
    Program("nginx", 60, 10),
    Program("orca_replay", 70, 10),
    Program("replay", 70, 45),
    Program("pinger", 80, 10),
    Program("monitors", 80, 10),
    Program("notifier", 80, 10),
    Program("dq_live", 80, 10),
)


def replay_files(lay: Layout) -> list[str]:
    """The ZDAB files the replay plays in a loop: the bundled run (if present) and the synthetic one."""
    files = [str(DEMO_ZDAB)] if DEMO_ZDAB.exists() else []
    return files + [str(lay.zdab)]


def commands(cfg, lay: Layout) -> dict[str, list[str]]:
    """The command line of every program (no secrets: they are in MINARD_CONFIG's file)."""
    minard = binary("minard")
    dispatcher = f"127.0.0.1:{cfg['dispatcher_port']}"
    pacing = (["--rate", str(float(cfg["stack_replay_rate"]))] if float(cfg["stack_replay_rate"]) > 0
              else ["--speed", str(cfg["stack_replay_speed"])])

    return {
        "redis": [binary("redis-server"), str(lay.redis_conf)],
        "dispatcher": [minard, "dispatcher"],
        "minard_dispatch_pull": [binary("minard_dispatch"), "pull"],
        "data_consumer_cmos": [binary("data_consumer"), str(zmq_port(cfg["zmq_cmos"]))],
        "data_consumer_base": [binary("data_consumer"), str(zmq_port(cfg["zmq_base"]))],
        # push and data_producer read dispatcher_host/port and orca_host/port from MINARD_CONFIG.
        "minard_dispatch_push": [binary("minard_dispatch"), "push"],
        "data_producer": [binary("data_producer")],
        "web": gunicorn_command(cfg, "web"),
        "snoplus_log": gunicorn_command(cfg, "snoplus_log"),
        "nginx": [binary("nginx"), "-p", f"{lay.nginx}/", "-c", str(lay.nginx_conf),
                  "-e", str(lay.logs / "nginx-error.log")],
        "orca_replay": [minard, "orca-replay", str(lay.orca), "--host", "127.0.0.1",
                        "--port", str(cfg["orca_port"]), "--loop", "--quiet"],
        "replay": [minard, "replay", *replay_files(lay), "--dispatcher", dispatcher, "--loop",
                   "--wait-analyzers", "1", "--no-progress", *pacing],  # no event before the push connects
        "pinger": [minard, "pinger"],
        "monitors": [minard, "monitors"],
        "notifier": [minard, "notifier"],
        "dq_live": [minard, "dq-live"],
    }


#: The gunicorn apps of the stack: program -> (port key, WSGI app, gunicorn --name).
WEB_APPS = {"web": ("web_port", "minard:app", "minard_web"),
            "snoplus_log": ("log_port", "snoplus_log:app", "snoplus_log")}


def gunicorn_command(cfg, program: str, port: int | None = None, workers: int | None = None) -> list[str]:
    """The gunicorn command line of web app *program* (``web`` or ``snoplus_log``), as ``minard up`` runs it.

    Loopback only, behind nginx (which buffers whole requests).  gevent
    workers: every connection is a greenlet, so clients that send half a
    request hold ``web_worker_connections`` slots at most, not the worker;
    their headers must arrive within ``--keep-alive`` seconds (the gevent
    worker reads every request line and headers under that deadline) and
    their body within ``web_body_timeout`` (:mod:`minard.gunicorn_conf`).
    Tests and ``bench/web.py`` start gunicorn with this command (*port* and
    *workers* replace the configured ones).
    """
    port_key, app, name = WEB_APPS[program]
    port = int(cfg[port_key]) if port is None else port
    workers = int(cfg["stack_web_workers"]) if workers is None else workers
    return [binary("gunicorn"), "-b", f"127.0.0.1:{port}", "--workers", str(workers), "--name", name,
            "--worker-class", "gevent", "--worker-connections", str(int(cfg["web_worker_connections"])),
            "--graceful-timeout", "10", "--timeout", "60", "--keep-alive", "5", *_gunicorn_options(),
            "-c", "python:minard.gunicorn_conf", app]  # metrics of all workers (docs/operations.md)


def _gunicorn_options() -> list[str]:
    """Options for this gunicorn version: no per-user control socket (two apps would share
    ~/.gunicorn/gunicorn.ctl; supervisord is the control interface here)."""
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return []
    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


def _supervisor_quote(args: list[str]) -> str:
    """A command line for supervisord: shell-quoted, with '%' escaped (it expands %(x)s)."""
    return " ".join(shlex.quote(a) for a in args).replace("%", "%%")


def supervisord_text(cfg, lay: Layout, stack_id: str, supervisor_password: str | None,
                     programs: tuple[Program, ...] = PROGRAMS, overrides: dict[str, list[str]] | None = None) -> str:
    """The rendered supervisord.conf of the stack (*overrides*: command lines replacing :func:`commands`')."""
    inet = ""
    if int(cfg["supervisor_port"]) > 0 and supervisor_password:
        digest = hashlib.sha1(supervisor_password.encode()).hexdigest()
        inet = ("[inet_http_server]\n; loopback only, with credentials (password in secrets/, 0600)\n"
                f"port=127.0.0.1:{int(cfg['supervisor_port'])}\nusername=minard\n"
                f"password={{SHA}}{digest}\n\n")
    values = {"supervisor_socket": lay.socket, "log_dir": lay.logs, "run_dir": lay.run, "root": ROOT,
              "minard_config": lay.minard_conf, "stack_id": stack_id, "inet_http_server": inet}
    text = render(template("supervisord.conf.in"), values)
    cmds = {**commands(cfg, lay), **(overrides or {})}
    snippet = template("program.conf.in")
    wrapper = [sys.executable, "-m", "minard.stack", "exec", "--"]
    for prog in programs:
        text += render(snippet, {"name": prog.name, "command": _supervisor_quote(wrapper + cmds[prog.name]),
                                 "root": ROOT, "priority": prog.priority, "stopsignal": "TERM",
                                 "stopwaitsecs": prog.stopwaitsecs, "log_dir": lay.logs})
    return text


def redis_text(cfg, lay: Layout) -> str:
    """The rendered redis.conf (no secret: the password is in the included auth file)."""
    return render(template("redis.conf.in"), {
        "redis_port": redis_port(cfg), "run_dir": lay.run, "redis_auth_file": lay.redis_auth,
        "redis_dir": lay.redis, "redis_maxmemory": cfg["stack_redis_maxmemory"]})


def nginx_text(cfg, lay: Layout) -> str:
    """The rendered nginx.conf: as the invoking user, local pid, logs and temp paths."""
    from minard.web import CSP

    # Started as root, nginx would hand its workers to 'nobody', who cannot
    # enter a private stack directory; an ordinary user needs no directive.
    user = "user root;" if os.geteuid() == 0 else "# (runs as the invoking user)"
    return render(template("nginx.conf.in"), {
        "user_line": user, "run_dir": lay.run, "log_dir": lay.logs, "nginx_dir": lay.nginx,
        "web_port": cfg["web_port"], "log_port": cfg["log_port"], "bind": cfg["stack_bind"],
        "nginx_port": cfg["nginx_port"], "static_dir": ROOT / "static", "csp": CSP, **_tls_blocks(cfg, lay)})


def tls_paths(cfg, lay) -> tuple[Path, Path]:
    """(certificate, key) of the site: nginx_tls_cert/_key, else the layout's ``tls_cert``/``tls_key``."""
    cert = Path(str(cfg["nginx_tls_cert"])) if cfg["nginx_tls_cert"] else lay.tls_cert
    key = Path(str(cfg["nginx_tls_key"])) if cfg["nginx_tls_key"] else cert.with_suffix(".key")
    return cert, key


def _tls_blocks(cfg, lay) -> dict[str, str]:
    """The listen lines, the HTTP-to-HTTPS redirect server and HSTS for nginx.conf.

    Without ``nginx_tls`` the site is plain HTTP on nginx_port.  With it, the
    site is HTTPS only on nginx_tls_port (TLS 1.2/1.3, HSTS) and nginx_port
    answers every request with a permanent redirect there.
    """
    bind, port = cfg["stack_bind"], int(cfg["nginx_port"])
    if not cfg["nginx_tls"]:
        return {"listen": f"        listen {bind}:{port};", "http_redirect_server": "", "hsts": ""}
    cert, key = tls_paths(cfg, lay)
    tls_port = int(cfg["nginx_tls_port"])
    target = "https://$host" + ("" if tls_port == 443 else f":{tls_port}") + "$request_uri"
    redirect = ("    # Plain HTTP only redirects: passwords and session cookies travel over HTTPS.\n"
                "    server {\n"
                f"        listen {bind}:{port};\n"
                "        server_name _;\n"
                f"        return 301 {target};\n"
                "    }\n")
    listen = (f"        listen {bind}:{tls_port} ssl;\n"
              f"        ssl_certificate {cert};\n"
              f"        ssl_certificate_key {key};\n"
              "        ssl_protocols TLSv1.2 TLSv1.3;\n"
              "        ssl_prefer_server_ciphers off;\n"
              "        ssl_session_cache shared:minard_tls:1m;\n"
              "        ssl_session_tickets off;")
    hsts = f'        add_header Strict-Transport-Security "max-age={int(cfg["nginx_hsts_seconds"])}" always;'
    return {"listen": listen, "http_redirect_server": redirect, "hsts": hsts}


def ensure_certificate(cert: Path, key: Path, echo=click.echo) -> None:
    """A self-signed certificate for this machine in *cert*/*key* (key 0600), made once with openssl.

    Valid for localhost, 127.0.0.1 and the host name, for a local stack; a
    production install uses a real certificate (docs/security.md).
    """
    if cert.exists() and key.exists():
        return
    echo(f"generating a self-signed TLS certificate {cert} (minard up --tls)")
    cert.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    tmp_key = key.with_name(f".{key.name}.tmp")
    os.close(os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    proc = subprocess.run(
        [binary("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "825", "-subj", "/CN=minard local stack", "-keyout", str(tmp_key), "-out", str(cert),
         "-addext", f"subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:{host}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=digitalSignature,keyCertSign"],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp_key.unlink(missing_ok=True)
        raise click.ClickException(f"openssl could not make a certificate: {proc.stderr.strip()[-300:]}")
    os.chmod(tmp_key, 0o600)
    os.chmod(cert, 0o640)
    os.replace(tmp_key, key)


def ensure_redis_users(lay: Layout) -> dict[str, dict[str, str]]:
    """Credentials of every Redis role in ``secrets/redis_acl.json`` (0600), made once.

    This is the ``redis_acl_file`` of the stack's processes; the ``user`` lines
    with the hashed passwords go into the 0600 redis-auth.conf.
    """
    from minard.store import acl

    users = {}
    if lay.redis_acl.exists():
        try:
            users = json.loads(lay.redis_acl.read_text(encoding="utf-8"))
        except ValueError:
            users = {}
    valid = isinstance(users, dict) and all(isinstance(users.get(r), dict) and users[r].get("password")
                                            and users[r].get("username") == acl.username(r) for r in acl.ROLES)
    if not valid:
        users = acl.new_credentials()
        write_private(lay.redis_acl, json.dumps(users, indent=1, sort_keys=True) + "\n")
    return users


def tighten_modes(root: Path) -> None:
    """No group write and nothing for others anywhere under *root* (files 0640/0600, dirs 0750/0700).

    A stack directory made by an older version (files 0644) is fixed on the next ``minard up``.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, name) if name else dirpath
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o027:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o027)


# ----------------------------------------------------------------- preparing a stack


def secret_file(path: Path, make=lambda: secrets.token_urlsafe(32)) -> str:
    """The secret stored in *path*, generated there (0600) on first use."""
    if path.exists():
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    value = make()
    write_private(path, value + "\n")
    return value


def stack_config(cfg, lay: Layout, password: str) -> config_mod.Config:
    """The configuration of the stack's processes: *cfg* with the stack's paths and Redis."""
    url = urllib.parse.urlsplit(str(cfg["redis_url"]))
    db = url.path or "/0"
    tls = {}
    if cfg["nginx_tls"]:
        cert, key = tls_paths(cfg, lay)
        tls = {"nginx_tls_cert": str(cert), "nginx_tls_key": str(key), "web_secure_cookies": True}
    return config_mod.Config(cfg).replace(
        var_dir=str(lay.var),
        redis_url=f"redis://:{urllib.parse.quote(password, safe='')}@127.0.0.1:{redis_port(cfg)}{db}",
        supervisor_socket=str(lay.socket),
        programs_file=str(lay.programs_cfg),
        keys_file=str(lay.var / "keys.json"),
        log_dir=str(lay.var / "logs"),
        log_url=f"http://127.0.0.1:{cfg['log_port']}",
        pinger_tokens_file=str(lay.tokens),
        dispatcher_keys_file=str(lay.var / "keys.json"),
        dispatcher_credentials_file=str(lay.dispatcher_credentials),
        dispatcher_accounting_dir=str(lay.var / "dispatcher"),
        record_dir=str(lay.var / "records"),
        stack_dir=str(lay.root),
        dispatcher_host="127.0.0.1",
        orca_host="127.0.0.1",
        redis_acl_file=str(lay.redis_acl),
        zmq_keys_dir=str(cfg["zmq_keys_dir"] or lay.secrets / "zmq"),
        **metrics_ports(cfg),
        **tls,
    )


def metrics_ports(cfg) -> dict[str, int]:
    """``metrics_port_<program>`` of every program: as configured, else the next from ``stack_metrics_port``."""
    from minard import metrics

    base = int(cfg["stack_metrics_port"])
    return {f"metrics_port_{p}": int(cfg[f"metrics_port_{p}"]) or (base + i if base > 0 else 0)
            for i, p in enumerate(metrics.PROGRAMS)}


def prometheus_text(cfg, host: str = "127.0.0.1") -> str:
    """A Prometheus scrape configuration for the metrics ports of *cfg* and the web app's /metrics."""
    from minard import metrics

    lines = ["# Prometheus scrape configuration of minard (docs/operations.md), written from the",
             "# metrics_port_<program> keys by minard up (stack) or render-production (conf/).",
             "global:", "  scrape_interval: 15s", "scrape_configs:",
             "  # each process's own counters (/metrics on its metrics port)",
             "  - job_name: minard", "    static_configs:"]
    for p in metrics.PROGRAMS:
        number = metrics.port(cfg, p)
        if number:
            lines += [f"      - targets: ['{host}:{number}']", f"        labels: {{program: {p}}}"]
    lines += ["  # the whole pipeline as Redis shows it (the web app's /metrics)",
              "  - job_name: minard_pipeline", "    metrics_path: /metrics", "    static_configs:",
              f"      - targets: ['{host}:{int(cfg['web_port'])}']"]
    return "\n".join(lines) + "\n"


def programs_text(cfg, lay: Layout, logs: dict[str, Path] | None = None, hosts: dict[str, str] | None = None) -> str:
    """The registry (programs.cfg) with each supervised program's log file for the Logs page.

    With ``minard up --hosts N``, *logs* maps a program to the log directory of
    the host running it and *hosts* to that host's name (the Status page shows it).
    """
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read(config_mod.Config(cfg).path("programs_file"), encoding="utf-8")
    for prog in PROGRAMS:
        if parser.has_section(prog.name):
            parser[prog.name]["log_file"] = str((logs or {}).get(prog.name, lay.logs) / f"{prog.name}.log")
            if prog.name in (hosts or {}):
                parser[prog.name]["host"] = hosts[prog.name]
    from io import StringIO

    buf = StringIO()
    buf.write("# The program registry of this stack: conf/programs.cfg with the log files\n"
              "# supervisord writes (written by minard up).\n\n")
    parser.write(buf)
    return buf.getvalue()


def ensure_tokens(scfg, lay: Layout, known: dict[str, str] | None = None) -> dict[str, str]:
    """A program token for every registered program, for the pinger (0600 file).

    Tokens are created with :mod:`minard.ops.keys` (only their hashes go to the key
    file); a token that no longer verifies (key file replaced, revoked) is
    replaced by the program's token in *known* (its dispatcher key: one token
    per program) if that one verifies, else issued again.
    """
    from minard.ops.keys import KeyStore
    from minard.ops.programs import Registry

    store = KeyStore.from_config(scfg)
    tokens = {}
    if lay.tokens.exists():
        tokens = json.loads(lay.tokens.read_text(encoding="utf-8") or "{}")
    changed = False
    for prog in Registry.from_config(scfg):
        if not store.verify(prog.name, tokens.get(prog.name), kind="program"):
            other = (known or {}).get(prog.name)
            ok = other is not None and store.verify(prog.name, other, kind="program")
            tokens[prog.name] = other if ok else store.add(prog.name, replace=True)
            changed = True
    if changed or not lay.tokens.exists():
        write_private(lay.tokens, json.dumps(tokens, indent=1, sort_keys=True) + "\n")
    return tokens


def ensure_dispatcher_credentials(scfg, lay: Layout) -> dict[str, str]:
    """A dispatcher key for each role's program (replay, push, recorder, control), 0600.

    The dispatcher verifies them against the stack's key file; a key that no
    longer verifies (revoked, replaced) is replaced by the pinger's token of
    that program if it works, else issued again.  Returns program -> token.
    """
    from minard.dispatcher.client import issue_credentials
    from minard.ops.keys import KeyStore

    programs = {role: str(scfg[f"dispatcher_{role}_programs"]).split(",")[0].strip()
                for role in ("source", "analyzer", "writer", "control")}
    pinger_tokens = {}
    if lay.tokens.exists():
        pinger_tokens = json.loads(lay.tokens.read_text(encoding="utf-8") or "{}")
    creds = issue_credentials(KeyStore(lay.var / "keys.json"), str(lay.dispatcher_credentials),
                              {r: p for r, p in programs.items() if p and p != "*"}, known=pinger_tokens)
    return {c.name: c.token for c in creds.values()}


def ensure_data(cfg, lay: Layout, echo=click.echo) -> None:
    """Write the synthetic ZDAB run and ORCA stream once (first start)."""
    minard = binary("minard")
    jobs = [
        (lay.zdab, [minard, "simulate", "zdab", "@OUT@", "--events", str(int(cfg["stack_sim_events"])),
                    "--rate", str(float(cfg["stack_sim_rate"])), "--run", str(SYNTHETIC_RUN),
                    "--seed", "1", "--no-progress"]),
        (lay.orca, [minard, "simulate", "orca", "@OUT@", "--seconds", str(float(cfg["stack_orca_seconds"])),
                    "--seed", "1", "--quiet"]),
    ]
    for path, args in jobs:
        if path.exists() and path.stat().st_size > 0:
            continue
        echo(f"writing synthetic data {path.name} (first start)")
        tmp = path.with_name(f".{path.name}.part")
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([str(tmp) if a == "@OUT@" else a for a in args],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise click.ClickException(f"minard simulate failed for {path.name}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, path)


def prepare(cfg, lay: Layout, stack_id: str, echo=click.echo) -> config_mod.Config:
    """Create the directories, secrets, data and rendered configurations; return the stack's config.

    Everything is created with umask 027 (files 0640 or 0600, directories
    0750 or 0700), and supervisord passes the same umask to every process.
    """
    os.umask(0o027)
    for d in (lay.root, lay.run, lay.logs, lay.data, lay.var, lay.redis, lay.nginx):
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
    tighten_modes(lay.root)
    lay.secrets.mkdir(mode=0o700, exist_ok=True)
    os.chmod(lay.secrets, 0o700)
    os.chmod(lay.run, 0o700)
    url_password = urllib.parse.urlsplit(str(cfg["redis_url"])).password
    password = urllib.parse.unquote(url_password) if url_password else secret_file(lay.redis_password)
    sup_password = secret_file(lay.supervisor_password) if int(cfg["supervisor_port"]) > 0 else None
    from minard.store import acl

    users = ensure_redis_users(lay)
    if cfg["nginx_tls"]:
        ensure_certificate(*tls_paths(cfg, lay), echo=echo)
    scfg = stack_config(cfg, lay, password)
    write_private(lay.minard_conf, config_text(scfg))
    write_public(lay.programs_cfg, programs_text(cfg, lay))
    write_private(lay.redis_auth, render(template("redis-auth.conf.in"), {
        "redis_password": password, "redis_users": acl.config_lines(users)}))
    write_public(lay.redis_conf, redis_text(cfg, lay))
    write_public(lay.nginx_conf, nginx_text(cfg, lay))
    write_public(lay.prometheus_yml, prometheus_text(scfg))
    write_private(lay.supervisord_conf, supervisord_text(cfg, lay, stack_id, sup_password))
    ensure_data(cfg, lay, echo)
    ensure_tokens(scfg, lay, known=ensure_dispatcher_credentials(scfg, lay))
    if not curve.insecure(scfg):
        curve.ensure_keys(curve.keys_dir(scfg))  # the producers' and consumers' CURVE keys, 0600
    return scfg


# ----------------------------------------------------------------- processes by pid


def pid_alive(pid: int) -> bool:
    """True if *pid* is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def tagged_pids(stack_id: str, program: str | None = None) -> list[int]:
    """Processes whose environment carries this stack's id (our own, never others').

    With *program*, only those of that supervisord program (``SUPERVISOR_PROCESS_NAME``,
    which supervisord sets and every child inherits).
    """
    needles = [f"{STACK_ENV}={stack_id}".encode()]
    if program:
        needles.append(f"SUPERVISOR_PROCESS_NAME={program}".encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = set(fh.read().split(b"\0"))
        except OSError:
            continue
        if all(n in env for n in needles) and pid_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group *pgid* (field 5 of /proc/PID/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return sorted(found)


def recorded_groups(lay: Layout) -> dict[str, int]:
    """The process group of every program's latest start (run/NAME.pgid)."""
    out = {}
    for f in lay.run.glob("*.pgid"):
        pgid = read_int(f)
        if pgid:
            out[f.stem] = pgid
    return out


def reap_and_exec(argv: list[str]) -> None:
    """Kill what a previous run of this program left behind, then become *argv*.

    supervisord restarts a program when its main process dies; after a
    ``kill -9`` its children may live on (nginx workers keep the port, so the
    new nginx cannot bind; pool workers idle forever).  Every program of the
    stack starts through this: the members of the process group recorded at
    its previous start (``run/NAME.pgid``; supervisord gives every program its
    own group), and anything still carrying the stack id and the program's
    name in its environment, are leftovers: stopped (SIGTERM, then SIGKILL)
    before the program starts.  The pid stays the same (exec).
    """
    stack_id, name = os.environ.get(STACK_ENV), os.environ.get("SUPERVISOR_PROCESS_NAME")
    conf = os.environ.get("MINARD_CONFIG")
    if stack_id and name and conf:
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)
        run_dir = Path(os.environ.get("MINARDSTACK_RUN") or Layout(Path(conf).parent).run)
        record = run_dir / f"{name}.pgid"
        old = read_int(record)
        stale = set(tagged_pids(stack_id, name)) | set(group_pids(old) if old else [])
        stale.discard(os.getpid())
        if stale:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{stamp} minard.stack[{os.getpid()}] WARNING stopping {len(stale)} leftover "
                  f"process(es) of {name} from its previous run: {sorted(stale)}", file=sys.stderr, flush=True)
            kill_pids(sorted(stale), grace=3.0)
        record.write_text(f"{os.getpid()}\n")
    os.execv(argv[0], argv)


def kill_pids(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM *pids*, SIGKILL those alive after *grace* seconds; return the ones killed."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    killed = []
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def read_int(path: Path) -> int | None:
    """An integer from a pid file, or None."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------- supervisord


def rpc(lay: Layout, timeout: float = 5.0):
    """An XML-RPC proxy to the stack's supervisord over its unix socket (supervisor's transport)."""
    from minard.web.supervisor import proxy, unix_url

    return proxy(unix_url(str(lay.socket)), timeout)


def supervisord_running(lay: Layout) -> bool:
    """True if the stack's supervisord answers on its socket."""
    try:
        return rpc(lay, 2.0).supervisor.getState()["statename"] == "RUNNING"
    except Exception:  # noqa: BLE001 - no socket, refused, half started: not running
        return False


def process_rows(lay: Layout) -> list[dict]:
    """supervisord's process table (state, pid, uptime, description)."""
    from minard.web.supervisor import process_table

    return process_table(str(lay.socket), timeout=5.0)["processes"]


def clean_env(stack_id: str) -> dict[str, str]:
    """The environment for supervisord: ours without MINARD_* (the stack's file is the truth)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_") and k != "MINARD_CONFIG"}
    env[STACK_ENV] = stack_id
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_ports(cfg) -> None:
    """Refuse to start when a port of the stack is taken (processes would only crash-loop)."""
    ports = {"redis": redis_port(cfg), "dispatcher": int(cfg["dispatcher_port"]),
             "zmq_dispatch": zmq_port(cfg["zmq_dispatch"]), "zmq_cmos": zmq_port(cfg["zmq_cmos"]),
             "zmq_base": zmq_port(cfg["zmq_base"]), "orca": int(cfg["orca_port"]),
             "web": int(cfg["web_port"]), "log": int(cfg["log_port"]), "nginx": int(cfg["nginx_port"])}
    if int(cfg["supervisor_port"]) > 0:
        ports["supervisor"] = int(cfg["supervisor_port"])
    if cfg["nginx_tls"]:
        ports["nginx_tls"] = int(cfg["nginx_tls_port"])
    ports.update({k: v for k, v in metrics_ports(cfg).items() if v})
    busy = []
    for name, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{name} {port}")
    if busy:
        raise click.ClickException("ports in use: " + ", ".join(busy)
                                   + " (another stack or service is running; change them in conf/minard.conf)")


def url_of(cfg) -> str:
    """The site's address through nginx (https on nginx_tls_port when nginx_tls is on)."""
    host = str(cfg["stack_bind"])
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if cfg["nginx_tls"]:
        return f"https://{host}:{cfg['nginx_tls_port']}/"
    return f"http://{host}:{cfg['nginx_port']}/"


def _health_request(cfg, lay) -> tuple[str, object]:
    """URL of nginx's /healthz and the SSL context to reach it (trusting the site's own certificate)."""
    if not cfg["nginx_tls"]:
        return f"http://127.0.0.1:{cfg['nginx_port']}/healthz", None
    import ssl

    context = ssl.create_default_context(cafile=str(tls_paths(cfg, lay)[0]))
    return f"https://127.0.0.1:{cfg['nginx_tls_port']}/healthz", context


def wait_running(lay: Layout, cfg, timeout: float, proc: subprocess.Popen | None = None) -> list[dict]:
    """Wait until every process is RUNNING and nginx answers; return the processes not running."""
    import urllib.request

    deadline = time.monotonic() + timeout
    bad: list[dict] = [{"name": "supervisord", "state": "STARTING"}]
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return [{"name": "supervisord", "state": f"EXITED ({proc.returncode})"}]
        try:
            rows = process_rows(lay)
            bad = [r for r in rows if r["state"] != "RUNNING"]
            if not bad:
                url, context = _health_request(cfg, lay)
                with urllib.request.urlopen(url, timeout=2, context=context) as r:
                    if r.status == 200:
                        return []
        except Exception:  # noqa: BLE001, S110 - still starting
            pass
        time.sleep(0.3)
    return bad


def start_supervisord(lay: Layout, stack_id: str, foreground: bool) -> subprocess.Popen:
    """Start supervisord in its own session (it outlives ``minard up`` unless *foreground*)."""
    out = open(lay.logs / "supervisord.out", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([binary("supervisord"), "-c", str(lay.supervisord_conf)],
                                env=clean_env(stack_id), cwd=str(ROOT), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=not foreground)
    finally:
        out.close()


# ----------------------------------------------------------------- up / down / status


def up(cfg, lay: Layout, foreground: bool = False, echo=click.echo) -> int:
    """Start the stack (or report that it runs); return an exit status."""
    if supervisord_running(lay):
        echo(f"minard stack in {lay.root} is already running")
        echo(f"open {url_of(cfg)}")
        return 0
    check_ports(cfg)
    stack_id = secrets.token_hex(8)
    echo(f"preparing the stack in {lay.root}")
    prepare(cfg, lay, stack_id, echo)
    write_public(lay.id_file, stack_id + "\n")
    for f in lay.run.glob("*.pgid"):  # groups of an earlier stack (its pids may be anyone's now)
        f.unlink()
    echo(f"starting supervisord ({len(PROGRAMS)} programs; logs in {lay.logs})")
    proc = start_supervisord(lay, stack_id, foreground)
    bad = wait_running(lay, cfg, float(cfg["stack_start_timeout"]), proc)
    if bad:
        names = ", ".join(f"{r['name']} ({r['state']})" for r in bad)
        echo(f"not running after {cfg['stack_start_timeout']}s: {names}; see {lay.logs}", err=True)
        if not foreground:
            return 1
    echo(f"minard is up: open {url_of(cfg)}")
    echo("  minard status   shows every process;   minard down   stops them all")
    # The stack's Redis has a password, kept in the stack's own configuration.
    echo(f"  for minard runs/stats/query against this stack: export MINARD_CONFIG={lay.minard_conf}")
    if foreground:
        return _foreground(lay, proc, echo)
    return 0 if not bad else 1


def _foreground(lay: Layout, proc: subprocess.Popen, echo) -> int:
    """Wait for supervisord; SIGINT/SIGTERM stop the whole stack."""
    def stop(signum, frame):
        echo(f"{signal.Signals(signum).name}: stopping the stack")
        proc.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    proc.wait()
    down(lay, echo=echo)
    return 0


#: supervisord states of a program that has not stopped yet.
_ACTIVE = frozenset({"STARTING", "RUNNING", "STOPPING"})


def stop_by_priority(lay: Layout, deadline: float) -> None:
    """Stop every program through supervisord's RPC, highest priority number first (sources
    first, Redis last), the programs of one priority together; return once all have stopped.

    supervisord's own shutdown keeps the same order but stops one program per turn of its
    main loop and then idles a whole 1 s poll before the next, about a second per program
    however fast it exits.  Each program still gets its ``stopwaitsecs`` (supervisord
    SIGKILLs it after that); *deadline* (monotonic) bounds the whole wait.
    """
    from xmlrpc.client import Fault

    proxy = rpc(lay, 30.0)
    levels: dict[int, list[str]] = {}
    for c in proxy.supervisor.getAllConfigInfo():
        levels.setdefault(int(c["process_prio"]), []).append(f"{c['group']}:{c['name']}")
    for priority in sorted(levels, reverse=True):
        names = levels[priority]
        for name in names:
            try:
                proxy.supervisor.stopProcess(name, False)
            except Fault:  # not running (stopped, exited, fatal): nothing to stop
                pass
        while time.monotonic() < deadline:
            states = {f"{p['group']}:{p['name']}": p["statename"] for p in proxy.supervisor.getAllProcessInfo()}
            if not any(states.get(n) in _ACTIVE for n in names):
                break
            time.sleep(0.05)


def down(lay: Layout, timeout: float = 90.0, echo=click.echo) -> int:
    """Stop supervisord and every process of the stack; verify by pid that none is left."""
    stack_id = (lay.id_file.read_text().strip() if lay.id_file.exists() else "")
    pids: set[int] = set()
    sup_pid = read_int(lay.pidfile)
    if supervisord_running(lay):
        try:
            pids.update(r["pid"] for r in process_rows(lay) if r.get("pid"))
        except Exception:  # noqa: BLE001, S110 - the sweep below still finds them
            pass
        echo(f"stopping the minard stack in {lay.root} (supervisord pid {sup_pid})")
        try:
            stop_by_priority(lay, time.monotonic() + timeout / 2)
        except Exception as exc:  # noqa: BLE001 - supervisord's own shutdown below still stops them
            echo(f"stopping the programs by priority failed ({type(exc).__name__}: {exc}); "
                 "leaving it to supervisord", err=True)
        try:
            rpc(lay).supervisor.shutdown()
        except Exception as exc:  # noqa: BLE001
            echo(f"supervisord did not accept shutdown ({type(exc).__name__}); killing by pid", err=True)
    else:
        echo(f"supervisord of {lay.root} is not running; looking for leftover processes")
    deadline = time.monotonic() + timeout
    while sup_pid and pid_alive(sup_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if stack_id:
        pids.update(tagged_pids(stack_id))
    for pgid in recorded_groups(lay).values():
        pids.update(group_pids(pgid))
    if sup_pid:
        pids.add(sup_pid)
    left = sorted(p for p in pids if pid_alive(p))
    killed = kill_pids(left) if left else []
    if left:
        echo(f"{len(left)} process(es) outlived supervisord: {left}; stopped ({len(killed)} with SIGKILL)")
    remaining = [p for p in pids if pid_alive(p)] + (tagged_pids(stack_id) if stack_id else []) + \
        [p for g in recorded_groups(lay).values() for p in group_pids(g)]
    if remaining:
        echo(f"processes still alive: {sorted(set(remaining))}", err=True)
        return 1
    for f in lay.run.glob("*.pgid") if lay.run.exists() else []:
        f.unlink()
    echo("minard is down: no process of the stack is left")
    return 0


def _duration(seconds: float | None) -> str:
    """Uptime as 'H:MM:SS' (days prefixed), like supervisorctl."""
    if seconds is None:
        return ""
    s = int(seconds)
    d, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{d} days, {text}" if d else text


def status_table(rows: list[dict], width: int = 24) -> str:
    """A supervisorctl-like table: name (*width* wide), state, pid, uptime (or the error)."""
    lines = []
    for r in rows:
        what = f"pid {r['pid']}, uptime {_duration(r['uptime'])}" if r["state"] == "RUNNING" else \
            (r.get("spawnerr") or r.get("description") or "")
        lines.append(f"{r['name']:<{width}} {r['state']:<10} {what}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------- command line


_dir_option = click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
                           help="Stack directory [stack_dir, var/stack].")


@click.command("up")
@_dir_option
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the whole stack.")
@click.option("--tls", is_flag=True, help="Serve the site over HTTPS on nginx_tls_port (HTTP redirects there) "
                                          "with a self-signed certificate made at first start [nginx_tls].")
@click.option("--hosts", "n_hosts", type=click.IntRange(5, 64), default=None, metavar="N",
              help="Spread the stack over N network namespaces on this machine (N >= 5; needs root): "
                   "event builder, DAQ, monitoring, data and front hosts, N > 5 adds pool hosts (docs/deploy.md).")
@click.option("--sentinels", is_flag=True, help="With --hosts N (N >= 6): a Redis replica on a second data host "
                                                "and three Sentinels; every process finds the primary through them.")
@config_mod.pass_config
def up_cmd(cfg, directory, foreground, tls, n_hosts, sentinels):
    """Start the whole stack under supervisord and print the site's URL."""
    if tls:
        cfg = cfg.replace(nginx_tls=True)
    if n_hosts is not None:
        from minard import hosts

        if foreground:
            raise click.UsageError("--foreground is for the one-host stack; stop a multi-host one with minard down")
        raise SystemExit(hosts.up(cfg, layout_for(cfg, directory).root, n_hosts, sentinels))
    if sentinels:
        raise click.UsageError("--sentinels needs --hosts N")
    raise SystemExit(up(cfg, layout_for(cfg, directory), foreground))


@click.command("down")
@_dir_option
@config_mod.pass_config
def down_cmd(cfg, directory):
    """Stop every process of the stack and check by pid that none is left.

    A multi-host stack (minard up --hosts N) also loses its namespaces and link.
    """
    lay = layout_for(cfg, directory)
    from minard import hosts

    if hosts.read_state(lay.root) is not None:
        raise SystemExit(hosts.down(lay.root))
    raise SystemExit(down(lay))


@click.command("status")
@_dir_option
@config_mod.pass_config
def status_cmd(cfg, directory):
    """Show every process of the stack (state, pid, uptime); exit 3 if it is not running."""
    lay = layout_for(cfg, directory)
    from minard import hosts
    from minard.web.supervisor import Unavailable

    if hosts.read_state(lay.root) is not None:
        raise SystemExit(hosts.status(lay.root))

    try:
        rows = process_rows(lay)
    except Unavailable as exc:
        click.echo(f"minard stack in {lay.root}: {exc}")
        raise SystemExit(3) from None
    click.echo(status_table(rows))
    raise SystemExit(0 if all(r["state"] == "RUNNING" for r in rows) else 1)


# ----------------------------------------------------------------- production reference

#: Under supervisord in production: the pipeline, the log server, pinger and
#: monitors.  Redis, nginx and the website have their own init scripts
#: (deploy/init.d), as in the seed's process list; the data comes from the DAQ.
PRODUCTION_PROGRAMS = tuple(p for p in PROGRAMS if p.name not in
                            ("redis", "nginx", "web", "orca_replay", "replay"))


@dataclass(frozen=True)
class ProductionLayout:
    """The paths of a production install (docs/deploy.md), with Layout's attribute names."""

    home: Path = Path("/opt/minard")
    etc: Path = Path("/etc/minard")
    run: Path = Path("/run/minard")
    logs: Path = Path("/var/log/minard")
    var: Path = Path("/var/lib/minard")

    def __getattr__(self, name: str) -> Path:
        paths = {"socket": self.run / "supervisor.sock", "minard_conf": self.etc / "minard.conf",
                 "redis_conf": self.etc / "redis.conf", "redis_auth": self.etc / "redis-auth.conf",
                 "nginx_conf": self.etc / "nginx.conf", "redis": self.var / "redis", "nginx": self.var / "nginx",
                 "orca": self.var / "orca.dat", "zdab": self.var / "run.zdab",
                 "tls_cert": self.etc / "tls" / "minard.crt", "tls_key": self.etc / "tls" / "minard.key",
                 "redis_acl": self.etc / "redis_acl.json"}
        if name not in paths:
            raise AttributeError(name)
        return paths[name]


def production_files() -> dict[str, str]:
    """conf/redis.conf, conf/nginx.conf and conf/supervisord.conf for the default ports and paths."""
    # nginx_tls: passwords and session cookies never cross the network in clear.
    cfg = config_mod.load({"stack_bind": "0.0.0.0", "nginx_tls": True}, env={}, path=ROOT / "conf" / "minard.conf")
    lay = ProductionLayout()
    binaries = {n: str(lay.home / ".venv" / "bin" / n) for n in ("minard", "gunicorn", "minard_dispatch",
                                                                 "data_producer", "data_consumer", "supervisord")}
    global binary
    saved = binary
    binary = lambda name: binaries.get(name) or {"redis-server": "/usr/bin/redis-server",
                                                 "nginx": "/usr/sbin/nginx"}[name]
    try:
        sup = supervisord_text(cfg, lay, "production", None, PRODUCTION_PROGRAMS)
        sup = sup.replace(sys.executable, str(lay.home / ".venv" / "bin" / "python")).replace(str(ROOT), str(lay.home))
        sup = sup.replace('MINARDSTACK_ID="production"', f'MINARDSTACK_ID="production",MINARDSTACK_RUN="{lay.run}"')
        nginx = nginx_text(cfg, lay).replace("user root;", "# (runs as the minard user: the init script or unit drops to it)")
        nginx = nginx.replace(str(ROOT), str(lay.home))
        return {"redis.conf": redis_text(cfg, lay), "nginx.conf": nginx, "supervisord.conf": sup,
                "prometheus.yml": prometheus_text({**cfg, **metrics_ports(cfg)})}
    finally:
        binary = saved


def write_production_files() -> None:
    """Regenerate the production reference files under conf/ (after changing a template)."""
    for name, text in production_files().items():
        write_public(ROOT / "conf" / name, text)


if __name__ == "__main__":  # python -m minard.stack exec -- COMMAND...: see reap_and_exec
    if len(sys.argv) > 3 and sys.argv[1:3] == ["exec", "--"]:
        reap_and_exec(sys.argv[3:])
    if sys.argv[1:] == ["render-production"]:
        write_production_files()
        sys.exit(0)
    sys.exit("usage: python -m minard.stack exec -- COMMAND [ARGS...] | render-production")
