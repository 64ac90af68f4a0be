"""The one configuration path of minard: every key declared once, typed, documented.

Values come, in increasing priority, from the defaults declared in :data:`KEYS`,
the INI file ``conf/minard.conf`` (or the file named by ``MINARD_CONFIG`` or the
root ``--config`` option of :mod:`minard.cli`), ``MINARD_*`` environment
variables, and a dict passed by the caller (the CLI's ``--log-level`` and the
tests do this).

Keys are flat ``section_name`` strings: ``[redis] url`` in the file is the key
``redis_url`` and the environment variable ``MINARD_REDIS_URL``.  Every key is a
:class:`Key` with a type, a default and a line of documentation; a value is
converted to the key's type when the configuration is loaded, so
``MINARD_DISPATCHER_PORT=7001`` becomes the int 7001 and ``seven`` is an error
at start-up.  ``docs/configuration.md`` is generated from :data:`KEYS`
(``python -m minard.config > docs/configuration.md``; a test checks it).

A process loads its configuration once (the root click group, or the app
factory under gunicorn) and passes it down; nothing writes into it afterwards.
"""

from __future__ import annotations

import configparser
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: The project checkout (for ``conf/`` and ``static/``); installs are editable.
ROOT = Path(__file__).resolve().parent.parent

#: The types a key may have (INI files and the environment only carry strings).
TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class Key:
    """One configuration key: its name, type, default and what it means."""

    name: str
    type: type
    default: object
    doc: str


@dataclass(frozen=True)
class Section:
    """A heading of docs/configuration.md for the keys that follow it."""

    title: str
    doc: str = ""


#: Every key, in the order of docs/configuration.md, under its section.
TABLE: tuple[Key | Section, ...] = (
    Section('General'),
    Key("var_dir", str, 'var',
        'directory for state, logs and generated files when running as an ordinary user (relative paths are under the checkout)'),
    Key("log_level", str, 'INFO',
        'logging level of every process (DEBUG, INFO, WARNING, ...)'),
    Section('Redis'),
    Key("redis_url", str, 'redis://127.0.0.1:6379/0',
        'Redis database of all time series, run summaries, counters and alarms (`redis://[:password@]host:port/db`; passwords are never logged)'),
    Key("redis_acl_file", str, '',
        'JSON file `{role: {"username", "password"}}` of the Redis ACL user of each role (`pipeline`, `dashboard`, `logserver`, `admin`; 0600, written by `minard up`); empty, missing, or a role not in it: the credentials in `redis_url` (see `minard.store.connection`)'),
    Key("redis_sentinels", str, '',
        'Redis Sentinels as a comma list of `host:port`; empty = connect to `redis_url` directly. When set, every process finds the primary through the Sentinels and `redis_url` supplies only the user, the password and the database (docs/deploy.md, "Several hosts")'),
    Key("redis_master_name", str, 'minard',
        "the Sentinels' name of the Redis primary (`sentinel monitor NAME ...`)"),
    Key("redis_sentinel_password_file", str, '',
        "file (0600, one line) with the Sentinels' own password; empty = the Sentinels need none"),
    Key("web_redis_replica", bool, False,
        "with `redis_sentinels`: the website reads the dashboards' data from a replica; alarms, sessions, sign-offs and every write still go to the primary"),
    Section('Dispatcher (event fan-out server)'),
    Key("dispatcher_host", str, '127.0.0.1',
        'host the dispatcher listens on and clients connect to'),
    Key("dispatcher_port", int, 7000,
        'dispatcher TCP port'),
    Key("dispatcher_analyzer_queue", int, 20000,
        'events queued per analyzer before that slow analyzer starts losing events (counted)'),
    Key("dispatcher_writer_queue", int, 2000,
        'records queued per write client before the data source is back-pressured (writers are lossless)'),
    Key("dispatcher_finished_timeout", float, 30.0,
        'seconds an analyzer may take to answer ENDTAPE with FINISHED before it is presumed dead and dropped'),
    Key("dispatcher_shutdown_wait", float, 15.0,
        'seconds SHUTDOWN waits after broadcasting QUIT before closing every connection'),
    Key("dispatcher_max_frame", int, 16 * 1024 * 1024,
        'largest frame payload (bytes) the dispatcher accepts; larger lengths close that connection'),
    Key("dispatcher_accounting_dir", str, 'var/dispatcher',
        'directory of `Accounting.dat` (ACCTREC)'),
    Section('Recorder (write client)'),
    Key("recorder_max_bytes", int, 1 << 30,
        'bytes of events per ZDAB file before `minard record` starts a new one'),
    Section('ZMQ endpoints between producers and consumers'),
    Key("zmq_dispatch", str, 'tcp://127.0.0.1:5560',
        'ZMQ endpoint of `minard_dispatch push` (binds) and `pull` (connects)'),
    Key("zmq_cmos", str, 'tcp://127.0.0.1:5557',
        'ZMQ endpoint for CMOS-rate records (`data_producer` → `data_consumer 5557`)'),
    Key("zmq_base", str, 'tcp://127.0.0.1:5558',
        'ZMQ endpoint for base-current records (`data_producer` → `data_consumer 5558`)'),
    Key("zmq_hwm", int, 200,
        'ZMQ high-water mark (messages) set explicitly on every PUSH/PULL socket. A message is one batch (up to `dispatch_batch_records` records, about 0.5 MB at nhit 40), so a queue holds at most about 100 MB and 200 000 events; beyond that the producer drops and counts whole batches'),
    Key("zmq_max_frame", int, 64 * 1024 * 1024,
        'largest ZMQ batch payload (bytes) a consumer accepts; larger ones are rejected and counted'),
    Key("zmq_insecure", bool, False,
        '`true` turns CURVE off: every ZMQ link is plain TCP, unauthenticated and unencrypted (each process logs a warning at start). Only for a trusted loopback'),
    Key("zmq_keys_dir", str, '',
        'directory of the ZMQ CURVE keys (`server.key[_secret]`, `client.key[_secret]`, `authorized/` public keys of the consumers a producer accepts), 0700 with 0600 files; empty = `<var_dir>/zmq_keys`. Made by `minard keys zmq` and `minard up` (or, if missing, by the first process that needs it)'),
    Key("zmq_backlog_records", int, 100000,
        'records a producer keeps while ZMQ refuses its batches (no consumer connected yet, or the high-water mark reached) and sends as soon as a consumer takes them; batches beyond it are dropped and counted (`dropped`, `backlog_full`)'),
    Section('ORCA data stream'),
    Key("orca_host", str, '127.0.0.1',
        'host of the ORCA data stream'),
    Key("orca_port", int, 44666,
        "TCP port of the ORCA data stream (ORCA's default 44666)"),
    Section('Web'),
    Key("web_port", int, 8080,
        'port of the dashboard (`gunicorn minard:app`)'),
    Key("log_port", int, 8081,
        'port of the log server (`gunicorn snoplus_log:app`)'),
    Key("nginx_port", int, 50000,
        'port nginx listens on'),
    Key("supervisor_port", int, 0,
        "supervisord's loopback XML-RPC/web port, only if set (bound to 127.0.0.1, with a generated password; its web UI acts on GET requests, see docs/security.md); 0 = unix socket only (0700), the default"),
    Section('Operations (log server, alarms, credentials)', 'An empty path means the default file under `var_dir` (see `minard.ops.programs.ops_path`).'),
    Key("programs_file", str, 'conf/programs.cfg',
        'registry of programs that post heartbeats and logs (name, host, description, timeout, link)'),
    Key("keys_file", str, '',
        'salted hashes of program tokens and shift-crew logins (0600; default under var_dir)'),
    Key("log_dir", str, '',
        'directory of the per-program log files written by the log server (default under var_dir)'),
    Key("log_max_bytes", int, 10 * 1024 * 1024,
        "size at which a program's log file rotates"),
    Key("log_backups", int, 5,
        'rotated log files kept per program'),
    Key("log_max_message", int, 16 * 1024,
        'largest log message (bytes) the log server accepts'),
    Key("log_url", str, 'http://127.0.0.1:8081',
        'URL of the log server for the client library and the pinger'),
    Key("alarm_history_days", int, 30,
        'days alarms are kept'),
    Key("alarm_max_shelve_hours", float, 72.0,
        'longest a shift-crew member may shelve an alarm'),
    Key("heartbeat_timeout", float, 30.0,
        'seconds without a heartbeat before a program is shown down (programs may set their own)'),
    Key("supervisor_socket", str, '',
        "supervisord's unix socket read by the Processes page"),
    Key("web_secret_key_file", str, '',
        'file of the Flask session key, generated at first start (0600; default under var_dir)'),
    Key("web_session_hours", float, 12.0,
        'hours a shift-crew login lasts at most (absolute lifetime of the server-side session)'),
    Key("web_secure_cookies", bool, False,
        'always mark session cookies Secure (they are anyway on every request that came over HTTPS)'),
    Section('Dispatch-stream monitoring (minard_dispatch push/pull, docs/storage.md)'),
    Key("dispatch_batch_records", int, 1000,
        'push: records per ZMQ batch at most'),
    Key("dispatch_batch_ms", float, 50.0,
        'push: longest a record waits before its batch goes'),
    Key("dispatch_stats_interval", float, 2.0,
        'push: seconds between dispatcher STATS? queries'),
    Key("dispatch_workers", int, 2,
        'pull: MaxSlaves of the pool'),
    Key("dispatch_max_total_workers", int, 4,
        'pull: MaxTotalSlaves'),
    Key("dispatch_trx_limit", int, 0,
        'pull: records before a worker is recycled; 0 = never'),
    Key("dispatch_idle_timeout", float, 300.0,
        'pull: seconds idle before a worker is stopped'),
    Key("dispatch_event_log", str, '',
        'pull: pool event log (default var_dir/dispatch_pool.log)'),
    Key("dispatch_close_retry", float, 3.0,
        'pull: seconds a stopping worker retries its last flush'),
    Key("dispatch_retry_records", int, 2000000,
        'pull: records whose aggregates a worker holds for a retry while Redis is unreachable (beyond: counted lost, retry_full)'),
    Key("dispatch_wait_replicas", int, 0,
        'pull: replicas that must have a flush (Redis WAIT, 200 ms) before it counts as written; 1 with Sentinel loses nothing in a failover'),
    Section('ORCA stream monitoring (data_producer, data_consumer 5557|5558, docs/storage.md)'),
    Key("orca_batch_records", int, 200,
        'producer: records per ZMQ batch at most'),
    Key("orca_batch_ms", float, 100.0,
        'producer: longest a record waits before its batch goes'),
    Key("orca_reconnect_max", float, 5.0,
        'producer: longest wait between reconnection attempts (s)'),
    Key("cmos_max_dt", float, 10.0,
        'CMOS rate only when 0 < dt <= cmos_max_dt seconds'),
    Key("cmos_workers", int, 2,
        'data_consumer 5557: MaxSlaves of the CMOS pool'),
    Key("base_workers", int, 2,
        'data_consumer 5558: MaxSlaves of the base-current pool'),
    Key("orca_max_total_workers", int, 4,
        'MaxTotalSlaves of each data_consumer process'),
    Key("orca_trx_limit", int, 0,
        'records before a worker is recycled; 0 = never'),
    Key("orca_idle_timeout", float, 300.0,
        'seconds idle before a worker is stopped'),
    Key("orca_event_log", str, '',
        'pool event log (default var_dir/orca_<stream>_pool.log)'),
    Key("orca_close_retry", float, 3.0,
        'seconds a stopping CMOS or base worker retries its last flush'),
    Key("orca_state_ttl", int, 86400,
        'seconds the shared CMOS state and latest maps outlive their last write'),
    Section('Whole stack (minard up, minard/stack.py; pinger and monitors, docs/deploy.md)'),
    Key("stack_dir", str, 'var/stack',
        'where minard up keeps configs, sockets, logs, data, secrets'),
    Key("stack_bind", str, '127.0.0.1',
        'address nginx listens on (0.0.0.0 to serve other machines)'),
    Key("stack_redis_maxmemory", str, '2gb',
        'Redis memory limit (maxmemory-policy noeviction)'),
    Key("stack_web_workers", int, 2,
        'gunicorn workers of each web app'),
    Key("stack_replay_speed", str, '1x',
        'pacing of the replayed ZDAB runs by their clock (or max)'),
    Key("stack_replay_rate", float, 0.0,
        'events/s for the replay instead of --speed; 0 = use the speed'),
    Key("stack_sim_events", int, 20000,
        'events of the synthetic run written at first start'),
    Key("stack_sim_rate", float, 1000.0,
        'its event rate in Hz'),
    Key("stack_orca_seconds", float, 120.0,
        'length of the synthetic ORCA stream (served in a loop)'),
    Key("stack_start_timeout", float, 60.0,
        'seconds minard up waits for every process to run'),
    Key("record_dir", str, 'var/records',
        'where minard record writes ZDAB files (watched for disk space)'),
    Key("pinger_period", float, 5.0,
        "seconds between the pinger's rounds of heartbeats"),
    Key("pinger_tokens_file", str, '',
        'program tokens for the pinger (0600; default var_dir/pinger_tokens.json)'),
    Key("monitors_file", str, 'conf/monitors.cfg',
        'monitors and their periods, one per line'),
    Key("stack_metrics_port", int, 9100,
        '`minard up` gives every program whose `metrics_port_<program>` is 0 the next port from this one, in the order of the table below (9100 dispatcher … 9109 monitors, 9110 notifier, 9111 dq_live); 0 = no metrics in the stack'),
    Section('Web security (docs/security.md)'),
    Key("web_session_idle_minutes", float, 60.0,
        'a login ends after this many minutes without a request (idle lifetime of the session in Redis)'),
    Key("web_login_limit_address", str, '20 per minute',
        'failed logins allowed per client address (Flask-Limiter syntax, e.g. `20 per minute;100 per day`); then 429 with Retry-After'),
    Key("web_login_limit_user", str, '5 per minute',
        'failed logins allowed per user name, known or not'),
    Key("web_proxy_hops", int, 1,
        'proxies (nginx) in front of gunicorn whose `X-Forwarded-For`/`-Proto` are trusted, for the client address and HTTPS; 0 when gunicorn faces clients itself'),
    Key("web_worker_connections", int, 1000,
        'simultaneous connections per gunicorn worker (`gevent` worker class) of both web apps; a client that sends half a request holds one of them until its headers time out (`--keep-alive`, 5 s) or its body does (`web_body_timeout`); each needs a file descriptor, so workers x connections must stay below the open-files limit (docs/security.md)'),
    Key("web_body_timeout", float, 10.0,
        'seconds within which a request body must arrive at gunicorn, read before the app runs; a slower body is answered 408 and counted (`minard_http_body_timeouts`); the same 10 s as nginx\'s `client_body_timeout` (docs/security.md)'),
    Key("web_warm_hours", float, 24.0,
        'hours of settled Stream-page data that the gunicorn workers of the dashboard decode into the shared cache (`webcache:rows:…`) ahead of any request, with the Detector-page default baselines (occupancy, 10-minute windows, `webcache:base:…`) of those hours and the block sums of that map at the 10 s level (`webcache:sum:…`), and every worker copies the stored blocks into its own memory, so that the first view of any window in them is fast (docs/web.md); 0 turns it off'),
    Key("nginx_tls", bool, False,
        'serve the site over HTTPS on `nginx_tls_port` with HSTS; plain HTTP on `nginx_port` only redirects (`minard up --tls` sets it and makes a self-signed certificate)'),
    Key("nginx_tls_port", int, 50443,
        'HTTPS port of nginx when `nginx_tls` is on'),
    Key("nginx_tls_cert", str, '',
        'PEM certificate (chain) of the site; default `stack_dir/secrets/tls.crt` for `minard up`, `/etc/minard/tls/minard.crt` in production'),
    Key("nginx_tls_key", str, '',
        'its private key (mode 0600); default beside the certificate (`tls.key`)'),
    Key("nginx_hsts_seconds", int, 31536000,
        '`Strict-Transport-Security: max-age` sent over HTTPS'),
    Section('Prometheus metrics (minard/metrics.py, docs/operations.md)', 'Each long-running program serves `/metrics` (Prometheus text format) on its own port. `0`, the\ndefault, turns it off (tools and tests); `minard up` allocates them from `stack_metrics_port` and\nwrites `prometheus.yml` for them into the stack directory; `conf/prometheus.yml` is the scrape\nconfiguration of a production install with the ports 9100–9111.'),
    Key("metrics_host", str, '127.0.0.1',
        'address every metrics port listens on (loopback: the metrics are for the local Prometheus)'),
    Key("metrics_port_dispatcher", int, 0,
        '`minard dispatcher`'),
    Key("metrics_port_minard_dispatch_pull", int, 0,
        '`minard_dispatch pull` (the pool and, in multiprocess mode, its workers)'),
    Key("metrics_port_data_consumer_cmos", int, 0,
        '`data_consumer 5557` (pool and workers)'),
    Key("metrics_port_data_consumer_base", int, 0,
        '`data_consumer 5558` (pool and workers)'),
    Key("metrics_port_minard_dispatch_push", int, 0,
        '`minard_dispatch push`'),
    Key("metrics_port_data_producer", int, 0,
        '`data_producer`'),
    Key("metrics_port_web", int, 0,
        '`gunicorn minard:app`, served by the gunicorn master for all workers (`-c python:minard.gunicorn_conf`)'),
    Key("metrics_port_snoplus_log", int, 0,
        '`gunicorn snoplus_log:app`, likewise'),
    Key("metrics_port_pinger", int, 0,
        '`minard pinger`'),
    Key("metrics_port_monitors", int, 0,
        '`minard monitors`'),
    Key("metrics_port_notifier", int, 0,
        '`minard notifier`'),
    Section('Alarms, notifications, supernova burst monitor (docs/operations.md)', 'Alarm limits live in `conf/alarms.cfg` (`alarms_file`), not here.'),
    Key("alarms_file", str, 'conf/alarms.cfg',
        'alarm definitions: conditions, priorities, delays, latching, suppression, guidance'),
    Key("smtp_host", str, '',
        'mail server for notifications; empty = no email'),
    Key("smtp_port", int, 25,
        'its port; STARTTLS is used whenever the server offers it'),
    Key("smtp_from", str, 'minard@localhost',
        'sender address of notification mails'),
    Key("smtp_user", str, '',
        'login at the mail server (optional; only sent over STARTTLS)'),
    Key("smtp_password_file", str, '',
        "file (mode 0600) holding that login's password; never logged"),
    Key("notify_webhook_url", str, '',
        'Mattermost/Slack-compatible incoming webhook (HTTP POST JSON `{"text": ...}`); empty = none'),
    Key("notify_priorities", str, 'critical,high',
        'alarm priorities that notify the on-call roster'),
    Key("notify_interval", float, 600.0,
        'at most one message per alarm per this many seconds'),
    Key("notify_escalate_minutes", float, 15.0,
        'an alarm unacknowledged this long also notifies the expert'),
    Key("notify_timeout", float, 10.0,
        'seconds allowed for one SMTP or webhook delivery'),
    Key("notify_period", float, 1.0,
        "seconds between the notifier's scans of the alarms"),
    Key("burst_nhit_threshold", int, 60,
        'events with at least this nhit count for the supernova burst search'),
    Key("burst_windows", str, '1,10',
        "sliding window lengths, seconds of the events' own 10 MHz clock (comma list)"),
    Key("burst_false_alarms_per_day", float, 0.01,
        "accepted false-alarm rate; sets each window's count threshold from the measured background"),
    Key("burst_min_background", float, 30.0,
        'seconds of measured background before the search is armed'),
    Key("burst_background_seconds", int, 300,
        'the latest clock seconds over which the background rate is measured'),
    Key("metrics_port_dq_live", int, 0,
        '`minard dq-live`'),
    Section('Dispatcher authentication, roles and limits (docs/protocol.md section 2.1, docs/security.md)'),
    Key("dispatcher_auth", bool, True,
        'every connection proves its role with a program key (HELLO + AUTH challenge-response); `false` only on an isolated test bench (logged as a warning)'),
    Key("dispatcher_keys_file", str, '',
        'key store the dispatcher verifies program keys against (default `keys_file`)'),
    Key("dispatcher_credentials_file", str, '',
        'the clients\' credentials, JSON `{role: {"name": program, "token": secret}}`, mode 0600 (default var_dir/dispatcher_credentials.json; `minard up` writes its own)'),
    Key("dispatcher_source_programs", str, 'replay',
        'programs (comma list, `*` = any with a valid key) that may connect as the data source'),
    Key("dispatcher_analyzer_programs", str, 'minard_dispatch_push',
        'programs that may connect as analyzers'),
    Key("dispatcher_writer_programs", str, 'recorder',
        'programs that may connect as write clients'),
    Key("dispatcher_control_programs", str, 'control',
        'programs that may connect as control clients'),
    Key("dispatcher_source_commands", str, 'BEGINTAPE,ENDTAPE,ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT',
        'commands the source may send (comma list, `*` = all)'),
    Key("dispatcher_analyzer_commands", str, 'FINISHED,ACCTREC,SCALERSUM,SCALERREC,ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT',
        'commands analyzers may send'),
    Key("dispatcher_writer_commands", str, 'ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT',
        'commands write clients may send'),
    Key("dispatcher_control_commands", str, 'EXIT,SHUTDOWN,DROP,BROADCAST,DUMP,ANALYZERS?,SCALERS?,STATS?,DIR?,QUIT',
        'commands control clients may send'),
    Key("dispatcher_source_hosts", str, '',
        'addresses or networks (comma list, e.g. `10.0.1.5,192.168.2.0/24`) the source may connect from; empty = any'),
    Key("dispatcher_analyzer_hosts", str, '',
        'the same for analyzers'),
    Key("dispatcher_writer_hosts", str, '',
        'the same for write clients'),
    Key("dispatcher_control_hosts", str, '',
        'the same for control clients'),
    Key("dispatcher_max_connections", int, 256,
        'open connections at most; more are sent one ERROR and closed (`connections_refused`)'),
    Key("dispatcher_handshake_timeout", float, 5.0,
        'seconds a connection has to finish HELLO + AUTH before it is closed (`handshake_timeouts`)'),
    Key("dispatcher_idle_timeout", float, 300.0,
        'seconds a control connection may stay silent before it is closed (`idle_timeouts`); 0 = never'),
    Key("dispatcher_accounting_period", float, 1.0,
        "seconds between writes of the runs' event accounting to Redis; what is not written yet is kept in the journal `pending_accounting.json` of `dispatcher_accounting_dir`, which a restarted dispatcher reads back (survives kill -9)"),
    Key("dispatcher_accounting_interval", int, 600,
        "seconds of one interval of a run's accounting (`minard runs show RUN --json` \"intervals\": events received, handed to each analyzer and dropped per interval, by the dispatcher's clock), so that a loss in a long run can be placed in time"),
    Key("dispatcher_unaccounted_delay", float, 30.0,
        "seconds after the end of a run (time for the pipeline to store its last events) before a non-zero `unaccounted` in the run's accounting raises a warning alarm"),
    Section('Data quality (minard dq, minard dq-live, docs/dq.md)'),
    Key("dq_file", str, 'conf/dq.cfg',
        'the checks, their thresholds and the run types they apply to'),
    Key("dq_interval", float, 30.0,
        'seconds between live checks of the current run by `minard dq-live`'),
    Key("dq_experts", str, '',
        'users allowed to sign runs pass/fail (space-separated; empty = every shift-crew login)'),
)

#: name -> :class:`Key`.
KEYS: dict[str, Key] = {k.name: k for k in TABLE if isinstance(k, Key)}
#: name -> default value (the configuration before any file or variable).
DEFAULTS: dict[str, object] = {k.name: k.default for k in KEYS.values()}


def _check_table() -> None:
    """Fail at import when a key is declared twice or its default has the wrong type."""
    names = [k.name for k in TABLE if isinstance(k, Key)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AssertionError(f"configuration keys declared twice: {dupes}")
    for k in KEYS.values():
        if k.type not in TYPES or type(k.default) is not k.type:
            raise AssertionError(f"config key {k.name}: default {k.default!r} is not a {k.type.__name__}")


_check_table()


#: Keys that minard no longer reads -> what took their place.  A file that still sets one
#: loads with a warning instead of failing: an upgrade must not stop a deployment whose
#: configuration predates it.
RETIRED = {
    "web_threads": "the web apps run gevent workers now: see web_worker_connections",
}


def coerce(key: str, raw: object) -> object:
    """*raw* (a string from a file or the environment, or a Python value) as the type of *key*.

    Raises ValueError, naming the key, for an unknown key or a value that is
    not of (and cannot be read as) the key's type.
    """
    spec = KEYS.get(key)
    if spec is None:
        raise ValueError(f"unknown configuration key {key!r} (docs/configuration.md lists them)")
    want = spec.type
    if isinstance(raw, str):
        return _parse(spec, raw)
    if want is str and isinstance(raw, (os.PathLike, int, float)) and not isinstance(raw, bool):
        return str(raw)
    if want is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if type(raw) is not want:
        raise ValueError(f"config {key}: {raw!r} is not a valid {want.__name__}")
    return raw


def _parse(spec: Key, raw: str) -> object:
    """A string value read as the type of *spec*."""
    if spec.type is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config {spec.name}: {raw!r} is not a boolean")
    try:
        return spec.type(raw.strip()) if spec.type is not str else raw
    except ValueError:
        raise ValueError(f"config {spec.name}: {raw!r} is not a valid {spec.type.__name__}") from None


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
    """The loaded configuration: a dict of key -> value of the key's type."""

    def path(self, key: str) -> Path:
        """Resolve a path-valued key relative to the project root."""
        p = Path(str(self[key]))
        return p if p.is_absolute() else ROOT / p

    def replace(self, **changes: object) -> Config:
        """A new configuration with *changes* (typed like :func:`load`); this one is unchanged.

        For a value that a process derives (``minard up``'s stack paths), so that
        nothing writes into a loaded configuration.
        """
        out = Config(self)
        for key, value in changes.items():
            out[key] = coerce(key, value)
        return out


def load(
    overrides: Mapping[str, object] | None = None,
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < file < environment < *overrides*.

    A key the file or *overrides* set that is not declared is an error (a
    typo would otherwise be ignored); ``MINARD_*`` variables that name no key
    (e.g. ``MINARD_HOME`` of the init scripts) are not configuration and are
    left alone.
    """
    env = os.environ if env is None else env
    cfg = Config(DEFAULTS)
    file = Path(path) if path is not None else default_path(env)
    if file.exists():
        for key, value in _read_file(file).items():
            if key in RETIRED:
                import logging

                logging.getLogger("minard.config").warning(
                    "%s: %s is no longer used (%s); remove it", file, key, RETIRED[key])
                continue
            try:
                cfg[key] = coerce(key, value)
            except ValueError as exc:
                raise ValueError(f"{file}: {exc}") from None
    elif path is not None:
        raise FileNotFoundError(f"configuration file {file} does not exist")
    for name, value in env.items():
        key = name[len("MINARD_"):].lower()
        if name.startswith("MINARD_") and key in KEYS:
            cfg[key] = coerce(key, value)
    for key, value in (overrides or {}).items():
        cfg[key] = coerce(key, value)
    return cfg


def pass_config(f):
    """Click decorator: call *f* with the :class:`Config` that the root command loaded.

    ``minard`` and the seed-named programs load the configuration once
    (``minard.cli.load_config``) into ``ctx.obj``; subcommands take it from
    there instead of loading it again.  Tests that invoke a subcommand on its
    own pass ``obj=config.load(...)`` to ``CliRunner.invoke``.
    """
    import click

    return click.make_pass_decorator(Config)(f)


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


# ------------------------------------------------------------------ documentation

INTRO = """\
# Configuration

<!-- Generated from minard/config.py by `python -m minard.config > docs/configuration.md`;
     tests/test_config.py fails when this page and the code differ. Edit the code, not this page. -->

Every minard process reads its settings in one place, `minard/config.py`, in this order (later wins):

1. the defaults declared in `minard/config.py` (the table below);
2. the INI file `conf/minard.conf`, or the file named by `MINARD_CONFIG` or by the global option
   `--config FILE` of `minard`, `minard_dispatch`, `data_producer` and `data_consumer`;
3. environment variables `MINARD_<KEY>` (upper case), e.g. `MINARD_REDIS_URL`, `MINARD_DISPATCHER_PORT`;
4. a dict passed by the caller: the global option `--log-level` sets `log_level` this way,
   and the tests put every port on a free one.

Keys are flat: `[redis] url` in the file is the key `redis_url` and the variable `MINARD_REDIS_URL`.
Every key has a type; a value is converted to it at start-up, and a value that is not of that type,
or a key the file sets that does not exist, is a clear error at start-up.
Relative paths are relative to the checkout. `minard up` writes its own `minard.conf` into the stack directory.
The shipped `conf/minard.conf` lists every key commented out with its default
(`python -m minard.config ini` writes it); it sets a key only where a value differs from the default.
The configuration is loaded once per process (by the root command, or the web app factory under
gunicorn) and passed down; nothing changes it at run time.
"""


def _cell(value: object) -> str:
    """A default as shown in the table (Python literal in backticks)."""
    return f"`{value!r}`"


def markdown() -> str:
    """docs/configuration.md: the introduction, then one table per section of :data:`TABLE`."""
    out = [INTRO]
    for item in TABLE:
        if isinstance(item, Section):
            out.append(f"\n## {item.title}\n")
            if item.doc:
                out.append(f"{item.doc}\n")
            out.append("| key | type | default | meaning |\n|---|---|---|---|")
        else:
            out.append(f"| `{item.name}` | {item.type.__name__} | {_cell(item.default)} | {item.doc} |")
    out.append("\n## Keys no longer used\n")
    out.append("A file that still sets one of these loads with a warning (remove the line).\n")
    out.append("| key | instead |\n|---|---|")
    out += [f"| `{name}` | {why} |" for name, why in RETIRED.items()]
    return "\n".join(out) + "\n"


INI_HEADER = """\
# minard configuration: conf/minard.conf, or the file named by MINARD_CONFIG or --config.
# Keys are flat "section_key" names: [redis] url is the key redis_url, overridden by
# the environment variable MINARD_REDIS_URL.  Every key is shown commented out with
# its default (written by `python -m minard.config ini`); docs/configuration.md
# describes them.  Uncomment a line only to set a value other than the default.
"""


def ini_template() -> str:
    """conf/minard.conf: every key commented out with its default, grouped into INI sections."""
    sections: dict[str, list[Key]] = {}
    for key in KEYS.values():
        sections.setdefault(key.name.partition("_")[0], []).append(key)
    out = [INI_HEADER]
    for head, keys in sections.items():
        out.append(f"[{head}]")
        for key in keys:
            value = str(key.default).lower() if key.type is bool else str(key.default)
            out += textwrap.wrap(key.doc.replace("`", ""), 86, initial_indent="# ", subsequent_indent="# ")
            out += [f"# {key.name.partition('_')[2]} = {value}".rstrip(), ""]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(ini_template() if sys.argv[1:] == ["ini"] else markdown(), end="")
