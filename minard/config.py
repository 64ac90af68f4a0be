"""The one configuration path of minard.

Values come, in increasing priority, from the defaults below, the INI file
``conf/minard.conf`` (or the file named by ``MINARD_CONFIG``), ``MINARD_*``
environment variables, and a dict passed by the caller (tests do this).

Keys are flat ``section_name`` strings: ``[redis] url`` in the file is the key
``redis_url`` and the environment variable ``MINARD_REDIS_URL``.  The type of
every value is the type of its default, so ``MINARD_DISPATCHER_PORT=7001``
becomes the int 7001.  ``docs/configuration.md`` lists every key.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from pathlib import Path

#: The project checkout (for ``conf/`` and ``static/``); installs are editable.
ROOT = Path(__file__).resolve().parent.parent

DEFAULTS: dict[str, object] = {
    # Where state and logs go when running as an ordinary user.
    "var_dir": "var",
    "log_level": "INFO",
    # Redis
    "redis_url": "redis://127.0.0.1:6379/0",
    "redis_sentinels": "",  # Sentinels host:port,host:port...; empty = redis_url directly (issue 18)
    "redis_master_name": "minard",  # the Sentinels' name of the primary
    "redis_sentinel_password_file": "",  # file (0600) with the Sentinels' password; empty = none
    "web_redis_replica": False,  # the website reads dashboard data from a replica (via Sentinel)
    # Dispatcher (event fan-out server)
    "dispatcher_host": "127.0.0.1",
    "dispatcher_port": 7000,
    "dispatcher_analyzer_queue": 20000,
    "dispatcher_writer_queue": 2000,
    "dispatcher_finished_timeout": 30.0,
    "dispatcher_shutdown_wait": 15.0,
    "dispatcher_max_frame": 16 * 1024 * 1024,
    "dispatcher_accounting_dir": "var/dispatcher",
    # Recorder (write client): bytes of events per file before it rotates
    "recorder_max_bytes": 1 << 30,
    # ZMQ endpoints between producers and consumers
    "zmq_dispatch": "tcp://127.0.0.1:5560",
    "zmq_cmos": "tcp://127.0.0.1:5557",
    "zmq_base": "tcp://127.0.0.1:5558",
    "zmq_hwm": 200,  # messages per socket queue; a dispatch batch is ~0.5 MB at nhit 40
    "zmq_max_frame": 64 * 1024 * 1024,
    "zmq_insecure": False,  # plain TCP on the ZMQ links (no CURVE); warned at start
    "zmq_keys_dir": "",  # CURVE keys (minard keys zmq); default var_dir/zmq_keys
    "zmq_backlog_records": 100_000,  # producer: records kept while no consumer takes them
    # ORCA data stream
    "orca_host": "127.0.0.1",
    "orca_port": 44666,
    # Web
    "web_port": 8080,
    "log_port": 8081,
    "nginx_port": 50000,
    "supervisor_port": 0,  # supervisord's loopback XML-RPC/web port; 0 = unix socket only
    # Operations (log server, alarms, credentials).  An empty path means the
    # default file under var_dir (see minard.ops.programs.ops_path).
    "programs_file": "conf/programs.cfg",
    "keys_file": "",
    "log_dir": "",
    "log_max_bytes": 10 * 1024 * 1024,
    "log_backups": 5,
    "log_max_message": 16 * 1024,
    "log_url": "http://127.0.0.1:8081",
    "alarm_history_days": 30,
    "alarm_max_shelve_hours": 72.0,
    "heartbeat_timeout": 30.0,
    "supervisor_socket": "",
    "web_secret_key_file": "",
    "web_session_hours": 12.0,
    "web_secure_cookies": False,
    # Dispatch-stream monitoring (minard_dispatch push/pull, docs/storage.md)
    "dispatch_batch_records": 1000,  # push: records per ZMQ batch at most
    "dispatch_batch_ms": 50.0,  # push: longest a record waits before its batch goes
    "dispatch_stats_interval": 2.0,  # push: seconds between dispatcher STATS? queries
    "dispatch_workers": 2,  # pull: MaxSlaves of the pool
    "dispatch_max_total_workers": 4,  # pull: MaxTotalSlaves
    "dispatch_trx_limit": 0,  # pull: records before a worker is recycled; 0 = never
    "dispatch_idle_timeout": 300.0,  # pull: seconds idle before a worker is stopped
    "dispatch_event_log": "",  # pull: pool event log (default var_dir/dispatch_pool.log)
    "dispatch_close_retry": 3.0,  # pull: seconds a stopping worker retries its last flush
    # ORCA stream monitoring (data_producer, data_consumer 5557|5558, docs/storage.md)
    "orca_batch_records": 200,  # producer: records per ZMQ batch at most
    "orca_batch_ms": 100.0,  # producer: longest a record waits before its batch goes
    "orca_reconnect_max": 5.0,  # producer: longest wait between reconnection attempts (s)
    "cmos_max_dt": 10.0,  # CMOS rate only when 0 < dt <= cmos_max_dt seconds
    "cmos_workers": 2,  # data_consumer 5557: MaxSlaves of the CMOS pool
    "base_workers": 2,  # data_consumer 5558: MaxSlaves of the base-current pool
    "orca_max_total_workers": 4,  # MaxTotalSlaves of each data_consumer process
    "orca_trx_limit": 0,  # records before a worker is recycled; 0 = never
    "orca_idle_timeout": 300.0,  # seconds idle before a worker is stopped
    "orca_event_log": "",  # pool event log (default var_dir/orca_<stream>_pool.log)
    "orca_state_ttl": 86400,  # seconds the shared CMOS state and latest maps outlive their last write
    # Whole stack (minard up, minard/stack.py; pinger and monitors, docs/deploy.md)
    "stack_dir": "var/stack",  # where minard up keeps configs, sockets, logs, data, secrets
    "stack_bind": "127.0.0.1",  # address nginx listens on (0.0.0.0 to serve other machines)
    "stack_redis_maxmemory": "2gb",  # Redis memory limit (maxmemory-policy noeviction)
    "stack_web_workers": 2,  # gunicorn workers of each web app
    "stack_replay_speed": "1x",  # pacing of the replayed ZDAB runs by their clock (or max)
    "stack_replay_rate": 0.0,  # events/s for the replay instead of --speed; 0 = use the speed
    "stack_sim_events": 20000,  # events of the synthetic run written at first start
    "stack_sim_rate": 1000.0,  # its event rate in Hz
    "stack_orca_seconds": 120.0,  # length of the synthetic ORCA stream (served in a loop)
    "stack_start_timeout": 60.0,  # seconds minard up waits for every process to run
    "record_dir": "var/records",  # where minard record writes ZDAB files (watched for disk space)
    "pinger_period": 5.0,  # seconds between the pinger's rounds of heartbeats
    "pinger_tokens_file": "",  # program tokens for the pinger (0600; default var_dir/pinger_tokens.json)
    "monitors_file": "conf/monitors.cfg",  # monitors and their periods, one per line
    # Web security (docs/security.md): sessions, login limits, proxy, TLS, gunicorn
    "web_session_idle_minutes": 60.0,  # a login ends after this long without a request
    "web_login_limit_address": "20 per minute",  # failed logins allowed per client address
    "web_login_limit_user": "5 per minute",  # failed logins allowed per user name
    "web_proxy_hops": 1,  # trusted proxies (nginx) in front of gunicorn for X-Forwarded-*; 0 = none
    "web_threads": 8,  # gunicorn gthread threads per worker
    "nginx_tls": False,  # serve the site over HTTPS (HTTP answers with a redirect)
    "nginx_tls_port": 50443,  # HTTPS port of nginx when nginx_tls is on
    "nginx_tls_cert": "",  # PEM certificate chain (default stack_dir/secrets/tls.crt for minard up)
    "nginx_tls_key": "",  # its private key (0600)
    "nginx_hsts_seconds": 31536000,  # Strict-Transport-Security max-age over HTTPS
    # Prometheus metrics (minard/metrics.py, docs/operations.md): /metrics of each program
    "metrics_host": "127.0.0.1",  # address every metrics port listens on
    **{f"metrics_port_{p}": 0 for p in (  # 0 = off; minard up gives each program a port
        "dispatcher", "minard_dispatch_pull", "data_consumer_cmos", "data_consumer_base",
        "minard_dispatch_push", "data_producer", "web", "snoplus_log", "pinger", "monitors", "notifier", "dq_live")},
    "stack_metrics_port": 9100,  # minard up: first of the consecutive metrics ports; 0 = none
    # Alarms, notifications, supernova burst monitor (docs/operations.md)
    "alarms_file": "conf/alarms.cfg",  # alarm definitions: conditions, priorities, delays, guidance
    "smtp_host": "",  # mail server for notifications; empty = no email
    "smtp_port": 25,  # its port (STARTTLS is used when the server offers it)
    "smtp_from": "minard@localhost",  # sender address of notification mails
    "smtp_user": "",  # login at the mail server (optional)
    "smtp_password_file": "",  # file (0600) holding that login's password
    "notify_webhook_url": "",  # Mattermost/Slack-compatible incoming webhook; empty = none
    "notify_priorities": "critical,high",  # priorities that notify the on-call roster
    "notify_interval": 600.0,  # at most one message per alarm per this many seconds
    "notify_escalate_minutes": 15.0,  # unacknowledged this long: notify the expert too
    "notify_timeout": 10.0,  # seconds for one SMTP or webhook delivery
    "notify_period": 1.0,  # seconds between the notifier's scans of the alarms
    "burst_nhit_threshold": 60,  # events with at least this nhit count for the burst search
    "burst_windows": "1,10",  # sliding window lengths (s of the events' 10 MHz clock)
    "burst_false_alarms_per_day": 0.01,  # accepted false-alarm rate that sets each window's threshold
    "burst_min_background": 30.0,  # seconds of measured background before the search is armed
    "burst_background_seconds": 300,  # latest clock seconds the background rate is measured over
    # Dispatcher authentication, roles and limits (docs/protocol.md section 2.1, docs/security.md)
    "dispatcher_auth": True,  # every connection proves its role with a program key (HELLO + AUTH)
    "dispatcher_keys_file": "",  # key store the dispatcher verifies against (default keys_file)
    "dispatcher_credentials_file": "",  # clients' {role: {name, token}} (0600; default var_dir/dispatcher_credentials.json)
    "dispatcher_source_programs": "replay",  # programs that may connect as each role (comma list; * = any)
    "dispatcher_analyzer_programs": "minard_dispatch_push",
    "dispatcher_writer_programs": "recorder",
    "dispatcher_control_programs": "control",
    "dispatcher_source_commands": "BEGINTAPE,ENDTAPE,ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT",
    "dispatcher_analyzer_commands": "FINISHED,ACCTREC,SCALERSUM,SCALERREC,ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT",
    "dispatcher_writer_commands": "ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT",
    "dispatcher_control_commands": "EXIT,SHUTDOWN,DROP,BROADCAST,DUMP,ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT",
    "dispatcher_source_hosts": "",  # addresses/networks a role may connect from (comma list; empty = any)
    "dispatcher_analyzer_hosts": "",
    "dispatcher_writer_hosts": "",
    "dispatcher_control_hosts": "",
    "dispatcher_max_connections": 256,  # connections beyond this are refused at once
    "dispatcher_handshake_timeout": 5.0,  # seconds to finish HELLO + AUTH before being closed
    "dispatcher_idle_timeout": 300.0,  # seconds a control connection may stay silent; 0 = forever
    "dispatcher_unaccounted_delay": 30.0,  # seconds after a run's end before unaccounted events raise an alarm
    # Data quality (docs/dq.md)
    "dq_file": "conf/dq.cfg",  # the checks, their thresholds and run types
    "dq_interval": 30.0,  # seconds between live checks of the current run
    "dq_experts": "",  # users allowed to sign runs pass/fail (space-separated; empty = every login)
}


def _coerce(key: str, raw: object) -> object:
    """Convert *raw* (usually a string) to the type of ``DEFAULTS[key]``."""
    default = DEFAULTS.get(key)
    if default is None or not isinstance(raw, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config {key}: {raw!r} is not a boolean")
    try:
        return type(default)(raw)
    except ValueError:
        raise ValueError(
            f"config {key}: {raw!r} is not a valid {type(default).__name__}"
        ) from None


def _read_file(path: Path) -> dict[str, str]:
    """Flatten an INI file into ``section_key`` entries."""
    parser = configparser.ConfigParser(interpolation=None)
    with open(path, encoding="utf-8") as fh:
        parser.read_file(fh)
    flat = {}
    for section in parser.sections():
        for key, value in parser.items(section):
            flat[f"{section}_{key}".lower()] = value
    return flat


def default_path(env: Mapping[str, str] | None = None) -> Path:
    """The configuration file used when none is named explicitly."""
    env = os.environ if env is None else env
    return Path(env.get("MINARD_CONFIG", ROOT / "conf" / "minard.conf"))


class Config(dict):
    """A dict of configuration values with a helper for paths under var_dir."""

    def path(self, key: str) -> Path:
        """Resolve a path-valued key relative to the project root."""
        p = Path(str(self[key]))
        return p if p.is_absolute() else ROOT / p


def load(
    overrides: Mapping[str, object] | None = None,
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < file < environment < *overrides*."""
    env = os.environ if env is None else env
    cfg = Config(DEFAULTS)
    file = Path(path) if path is not None else default_path(env)
    if file.exists():
        for key, value in _read_file(file).items():
            cfg[key] = _coerce(key, value)
    elif path is not None:
        raise FileNotFoundError(f"configuration file {file} does not exist")
    for name, value in env.items():
        if name.startswith("MINARD_") and name != "MINARD_CONFIG":
            key = name[len("MINARD_"):].lower()
            cfg[key] = _coerce(key, value)
    for key, value in (overrides or {}).items():
        cfg[key] = _coerce(key, value)
    return cfg


def redact(url: str) -> str:
    """*url* with any password replaced by ``***``, for logs and error messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return str(url)
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
