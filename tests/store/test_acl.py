"""Redis ACL users per role (minard/store/acl.py) against a real redis-server.

The dashboard's user reads everything and writes only what the website
writes: no FLUSHALL, no CONFIG, no pipeline keys.  The whole website (login,
rate limits, sessions, alarm acknowledgement and shelve, heartbeat checks)
works as that user.
"""

from __future__ import annotations

import re
import subprocess
import urllib.parse

import pytest
import redis as redis_py
from redis.exceptions import NoPermissionError, ResponseError

from minard.ops.keys import KeyStore
from minard.store import acl, alarms, schema, sessions, status
from minard.store import timeseries as ts
from minard.testing import free_port, redis_server_binary, stop_pid, wait_port
from minard.web import create_app

ADMIN_PASSWORD = "admin-test-password"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    """A redis-server with the generated role users (and the default user as the admin)."""
    work = tmp_path_factory.mktemp("acl")
    users = acl.new_credentials()
    auth = work / "auth.conf"
    auth.write_text(f"requirepass {ADMIN_PASSWORD}\n" + acl.config_lines(users))
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
                             "--save", "", "--appendonly", "no", "--include", str(auth)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, users
    finally:
        stop_pid(proc)


def url(port: int, users: dict, role: str) -> str:
    u = users[role]
    return f"redis://{u['username']}:{urllib.parse.quote(u['password'], safe='')}@127.0.0.1:{port}/0"


@pytest.fixture
def clients(acl_redis):
    port, users = acl_redis
    admin = redis_py.Redis(host="127.0.0.1", port=port, password=ADMIN_PASSWORD)
    admin.flushall()
    out = {role: redis_py.Redis.from_url(url(port, users, role)) for role in acl.ROLES}
    yield out
    for c in out.values():
        c.close()
    admin.close()


def denied(call) -> bool:
    """True if Redis refuses *call* for lack of permission."""
    try:
        call()
    except NoPermissionError:
        return True
    except ResponseError as exc:
        return "NOPERM" in str(exc)
    return False


def test_the_redis_config_holds_no_password_in_clear():
    creds = acl.new_credentials()
    text = acl.config_lines(creds)
    assert all(c["password"] not in text for c in creds.values())
    assert len(re.findall(r"^user minard-\w+ reset on #[0-9a-f]{64} ", text, re.MULTILINE)) == 4


def test_every_key_family_of_the_schema_has_a_writer_and_the_dashboard_writes_no_pipeline_family():
    keys = {name: re.sub(r"<[a-z]+>", "7", f.shape) for name, f in schema.families().items()}
    keys.update({k: k for k in schema.single_keys()})
    orphans = [name for name, key in keys.items() if not acl.writers(key)]
    assert not orphans, f"no role may write {orphans}: add them to minard/store/acl.py"
    pipeline_families = ("SCALAR", "CHANNEL", "RUN", "RUN_PART", "STATUS", "STATS", "POOL_FLUSHED", "ORCA_CMOS_STATE",
                         "ORCA_LATEST", "ORCA_LATEST_TIME", "DISPATCHER_SCALERS", "runs:start", "runs:end",
                         "pipeline:components", "orca:{base}:busy")
    assert not [n for n in pipeline_families if "dashboard" in acl.writers(keys[n])]
    assert acl.writers(sessions.SESSION_KEY.format(digest="ab")) == ["dashboard"]


TS_KEY, RUN_KEY = ts.scalar_key(1, 100, "trig"), schema.RUN.key(run=7)


def test_the_dashboard_user_cannot_flush_configure_or_write_pipeline_keys(clients):
    pipe_client, dash = clients["pipeline"], clients["dashboard"]
    pipe_client.hset(TS_KEY, "TOTAL", 5)
    pipe_client.set(RUN_KEY, "x")
    assert denied(dash.flushall) and denied(dash.flushdb)
    assert denied(lambda: dash.config_get("*")) and denied(lambda: dash.config_set("appendonly", "no"))
    assert denied(lambda: dash.execute_command("ACL", "LIST")) and denied(lambda: dash.execute_command("MONITOR"))
    assert denied(lambda: dash.execute_command("SHUTDOWN", "NOSAVE")) and denied(lambda: dash.bgsave())
    assert denied(lambda: dash.hset(TS_KEY, "TOTAL", 0))
    assert denied(lambda: dash.delete(RUN_KEY)) and denied(lambda: dash.set("status:minard_dispatch_pull", "x"))
    assert denied(lambda: dash.hincrby("stats:dispatch", "dropped", -5))
    assert denied(lambda: dash.expire(TS_KEY, 1))
    # It still reads everything the pages show.
    assert dash.hget(TS_KEY, "TOTAL") == b"5" and dash.get(RUN_KEY) == b"x"
    assert dash.scan(0, match="ts:*", count=100)[1] == [TS_KEY.encode()]


def test_no_role_but_admin_may_flush_or_configure(clients):
    for role in ("pipeline", "dashboard", "logserver"):
        assert denied(clients[role].flushall), role
        assert denied(lambda r=role: clients[r].config_get("dir")), role
    assert clients["admin"].config_get("maxmemory-policy") and clients["admin"].flushall()


def test_each_role_writes_only_its_own_families(clients):
    pipe_client, log_client = clients["pipeline"], clients["logserver"]
    p = pipe_client.pipeline()
    ts.add(p, "stream", 1_700_000_000.0, {"events": 3})
    p.execute()
    p = pipe_client.pipeline()
    status.beat(p, "minard_dispatch_pull", {"workers": 2})
    p.execute()
    assert denied(lambda: pipe_client.hset(sessions.SESSION_KEY.format(digest="0" * 64), "user", "eve"))
    assert denied(lambda: pipe_client.set("minard:ops:hb:dispatcher", "x"))
    # The monitors (logserver role) need INFO and write their own series; not the pipeline's.
    assert log_client.info("memory")["used_memory"] > 0
    p = log_client.pipeline()
    ts.put(p, "mon", 1_700_000_000.0, {"redis.used_memory": 1.0})
    p.execute()
    assert denied(lambda: log_client.hset("ts:1:1:trig", "TOTAL", 1))
    assert alarms.raise_alarm(log_client, 40, "from a log record") > 0


def test_the_whole_website_works_as_the_dashboard_user(clients, acl_redis, registry_cfg):
    port, users = acl_redis
    registry_cfg.update(redis_url=url(port, users, "dashboard"), web_login_limit_user="3 per minute",
                        supervisor_socket="/nonexistent/supervisor.sock")
    password = KeyStore.from_config(registry_cfg).add("alice", kind="user")
    alarm = alarms.raise_alarm(clients["pipeline"], 40, "HV trip")
    client = create_app(registry_cfg).test_client()
    for path in ("/status", "/alarms", "/api/alarms", "/api/status", "/runs", "/api/stream?window=60"):
        assert client.get(path).status_code == 200, path

    def csrf():
        return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/alarms").get_data(as_text=True)).group(1)

    codes = [client.post("/login", data={"username": "bob", "password": "x", "csrf_token": csrf()}).status_code
             for _ in range(4)]
    assert codes == [401, 401, 401, 429]  # the rate limiter's counters are written as the dashboard
    resp = client.post("/login", data={"username": "alice", "password": password, "csrf_token": csrf()})
    assert resp.status_code == 302
    assert client.post(f"/alarms/{alarm}/shelve", data={"csrf_token": csrf(), "minutes": "15"}).status_code == 303
    assert alarms.get(clients["admin"], alarm)["state"] == "shelved"
    assert client.post(f"/alarms/{alarm}/unshelve", data={"csrf_token": csrf()}).status_code == 303
    assert client.post(f"/alarms/{alarm}/ack", data={"csrf_token": csrf()}).status_code == 303
    assert sessions.counters(clients["admin"])["login_failed"] == 3
