"""The host layout of ``minard up --hosts N`` (minard/hosts.py), without namespaces."""

import pytest

from minard import hosts, stack
from minard.ops import topology


def test_five_hosts_run_every_program_of_the_stack_exactly_once():
    placed = [p for h in hosts.plan(5) for p in h.programs]
    assert sorted(placed) == sorted(p.name for p in stack.PROGRAMS)
    assert [h.name for h in hosts.plan(5)] == ["data", "event_builder", "monitoring", "daq", "front"]


def test_each_host_runs_the_programs_of_its_roles_deploy_hosts_conf():
    roles = {r.name: r for r in topology.ROLES}
    for h in hosts.plan(5):
        assert set(roles[h.role].programs) <= set(h.programs), h
        assert set(h.programs) - set(roles[h.role].programs) == set(hosts.SERVICES.get(h.role, ())), h


def test_more_than_five_hosts_add_pool_only_monitoring_hosts():
    extra = hosts.plan(7)[5:]
    assert [(h.name, h.role, h.programs) for h in extra] == [
        ("monitoring2", "monitoring", ("minard_dispatch_pull",)),
        ("monitoring3", "monitoring", ("minard_dispatch_pull",))]


def test_fewer_than_five_hosts_is_refused():
    with pytest.raises(ValueError, match="at least 5"):
        hosts.plan(4)


def test_with_sentinels_the_sixth_host_is_the_replica_and_three_hosts_run_a_sentinel():
    plans = {h.name: h for h in hosts.plan(6, sentinels=True)}
    assert set(plans) == {"data", "data2", "event_builder", "monitoring", "daq", "front"}
    assert plans["data2"].role == "data" and plans["data2"].programs == ("redis", "redis_sentinel")
    assert [h for h, p in plans.items() if "redis_sentinel" in p.programs] == ["data", "data2", "front"]
    with pytest.raises(ValueError, match="at least 6"):
        hosts.plan(5, sentinels=True)


def test_sentinel_settings_name_the_three_sentinels_and_let_the_web_tier_read_the_replica():
    addr = {"data": "198.18.7.1", "data2": "198.18.7.2", "front": "198.18.7.6"}
    assert hosts.sentinel_settings({}, addr) == {
        "redis_sentinels": "198.18.7.1:26379,198.18.7.2:26379,198.18.7.6:26379", "web_redis_replica": True}
    assert hosts.sentinel_settings({}, {"data": "198.18.7.1", "front": "198.18.7.5"}) == {}
