"""minard.store.connection.redis(cfg, role): one factory, ACL users per role, real redis-server."""

import json
import os

import pytest
import redis as redis_py

from minard import config
from minard.store import connection
from minard.testing import RedisServer


@pytest.fixture
def acl_user(redis_client):
    """A Redis ACL user ``pipe_user`` (password ``pipe-pw``) that may run every command; removed after."""
    redis_client.execute_command("ACL", "SETUSER", "pipe_user", "on", ">pipe-pw", "~*", "&*", "+@all")
    yield "pipe_user", "pipe-pw"
    redis_client.execute_command("ACL", "DELUSER", "pipe_user")


def _acl_file(tmp_path, users, mode=0o600):
    path = tmp_path / "redis_acl.json"
    path.write_text(json.dumps(users))
    os.chmod(path, mode)
    return path


def _cfg(redis_url, **over):
    return config.load({"redis_url": redis_url, **over}, env={})


def test_a_role_listed_in_the_acl_file_connects_as_its_user(redis_url, tmp_path, acl_user):
    name, password = acl_user
    path = _acl_file(tmp_path, {"pipeline": {"username": name, "password": password}})
    client = connection.redis(_cfg(redis_url, redis_acl_file=str(path)), "pipeline")
    try:
        assert client.execute_command("ACL", "WHOAMI") in (name, name.encode())
    finally:
        client.close()


def test_the_acl_users_password_is_the_one_used_not_the_urls(redis_url, tmp_path, acl_user):
    name, _ = acl_user
    path = _acl_file(tmp_path, {"dashboard": {"username": name, "password": "wrong"}})
    client = connection.redis(_cfg(redis_url, redis_acl_file=str(path)), "dashboard")
    try:
        with pytest.raises(redis_py.AuthenticationError):
            client.ping()
    finally:
        client.close()


def test_a_role_missing_from_the_file_or_no_file_uses_the_url_credentials(tmp_path):
    with RedisServer(password="url-secret") as server:
        path = _acl_file(tmp_path, {"pipeline": {"username": "x", "password": "y"}})
        for cfg in (_cfg(server.url, redis_acl_file=str(path)), _cfg(server.url),
                    _cfg(server.url, redis_acl_file=str(tmp_path / "absent.json"))):
            client = connection.redis(cfg, "admin")
            try:
                assert client.execute_command("ACL", "WHOAMI") in ("default", b"default")
            finally:
                client.close()


def test_an_unknown_role_is_rejected(redis_url):
    with pytest.raises(connection.RedisConfigError, match="unknown Redis role 'root'"):
        connection.redis(_cfg(redis_url), "root")


def test_an_acl_file_readable_by_everyone_is_refused(redis_url, tmp_path):
    path = _acl_file(tmp_path, {"admin": {"username": "a", "password": "topsecret"}}, mode=0o644)
    with pytest.raises(connection.RedisConfigError, match="readable by everyone") as err:
        connection.redis(_cfg(redis_url, redis_acl_file=str(path)), "admin")
    assert "topsecret" not in str(err.value)


def test_a_malformed_acl_file_is_a_clear_error_without_its_content(redis_url, tmp_path):
    path = tmp_path / "redis_acl.json"
    path.write_text('{"admin": {"username": "a", "password": "topsecret"')
    os.chmod(path, 0o600)
    with pytest.raises(connection.RedisConfigError, match="cannot read the Redis ACL file") as err:
        connection.redis(_cfg(redis_url, redis_acl_file=str(path)), "admin")
    assert "topsecret" not in str(err.value)
    bad = _acl_file(tmp_path, {"admin": {"username": "a"}})
    with pytest.raises(connection.RedisConfigError, match="string username and password"):
        connection.redis(_cfg(redis_url, redis_acl_file=str(bad)), "admin")


def test_each_role_gets_its_timeouts_and_callers_options_win(redis_url):
    cfg = _cfg(redis_url)
    for role, profile in connection.PROFILES.items():
        client = connection.redis(cfg, role)
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == profile.socket_timeout
        assert kwargs["socket_connect_timeout"] == profile.connect_timeout
        assert kwargs["health_check_interval"] == profile.health_check_interval
        client.close()
    client = connection.redis(cfg, "admin", decode_responses=True, socket_timeout=None)
    try:
        client.set("k", "v")
        assert client.get("k") == "v"
        assert client.connection_pool.connection_kwargs["socket_timeout"] is None
    finally:
        client.close()


def test_a_client_reconnects_after_redis_restarts():
    with RedisServer() as server:
        client = connection.redis(_cfg(server.url), "pipeline")
        try:
            client.set("before", 1)
            server.stop()
            server.start()
            assert client.set("after", 1)  # the stale pooled connection is retried, not raised
        finally:
            client.close()


def test_a_bad_url_is_an_error_that_hides_its_password():
    with pytest.raises(connection.RedisConfigError) as err:
        connection.redis(_cfg("http://:hunter2@host:1/0"), "admin")
    assert "hunter2" not in str(err.value)


def test_a_timeout_is_not_retried_so_a_command_never_runs_twice(redis_url, redis_client):
    redis_client.config_resetstat()
    client = connection.redis(_cfg(redis_url), "admin", socket_timeout=0.2)
    try:
        with pytest.raises(redis_py.TimeoutError):
            client.blpop(["never-filled"], timeout=2)
    finally:
        client.close()
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_blpop"]["calls"] == 1


@pytest.mark.slow
def test_with_sentinels_a_role_reaches_the_primary_and_a_replica_and_ignores_the_url_address():
    from minard.testing.redis_ha import RedisHA

    with RedisHA() as ha:
        host_free_url = ha.url.replace("127.0.0.1", "192.0.2.1")  # redis_url's address is not used
        cfg = _cfg(host_free_url, redis_sentinels=ha.sentinels_value, redis_master_name=ha.master_name)
        primary = connection.redis(cfg, "pipeline")
        replica = connection.redis(cfg, "dashboard", replica=True)
        try:
            primary.set("via-sentinel", "1")
            assert primary.info("replication")["role"] == "master"
            assert replica.info("replication")["role"] == "slave"
            assert primary.connection_pool.connection_kwargs["socket_timeout"] == \
                connection.PROFILES["pipeline"].socket_timeout
        finally:
            primary.close()
            replica.close()
