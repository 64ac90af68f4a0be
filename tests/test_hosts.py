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
