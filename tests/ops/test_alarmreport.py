"""The alarm CLIs: ``minard alarms list --json`` (interface), flags, out of service, KPIs,
and ``minard shift summary [--since T] [--markdown]``."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from minard.cli import main
from minard.ops import alarmreport
from minard.store import alarms, roster


def _root(cli):
    """``minard alarms|shift``: the root loads the configuration (ctx.obj)."""
    return [{alarmreport.alarms_cli: "alarms", alarmreport.shift_cli: "shift"}[cli]]


def run(cli, args, redis_url):
    result = CliRunner().invoke(main, _root(cli) + list(args), env={"MINARD_REDIS_URL": redis_url},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_alarms_list_json_has_the_interface_fields(redis_url, redis_client):
    i = alarms.raise_alarm(redis_client, 40, "burst", name="supernova_burst", priority="critical")
    j = alarms.raise_alarm(redis_client, 30, "lag", name="consumer_lag", priority="medium")
    alarms.acknowledge(redis_client, j, "alice")
    k = alarms.raise_alarm(redis_client, 40, "disk", name="disk_full", priority="critical")
    alarms.shelve(redis_client, k, "bob", time.time() + 600)
    rows = {a["id"]: a for a in json.loads(run(alarmreport.alarms_cli, ["list", "--json"], redis_url))}
    for a in rows.values():
        assert {"id", "name", "priority", "state", "raised", "acknowledged", "shelved"} <= set(a)
    assert (rows[i]["name"], rows[i]["priority"], rows[i]["state"]) == ("supernova_burst", "critical", "unacknowledged")
    assert rows[j]["state"] == "acknowledged" and rows[j]["acknowledged"] >= rows[j]["raised"]
    assert rows[k]["state"] == "shelved" and rows[k]["shelved"] is not None
    only = json.loads(run(alarmreport.alarms_cli, ["list", "--json", "--state", "shelved"], redis_url))
    assert [a["id"] for a in only] == [k]
    assert "supernova_burst" in run(alarmreport.alarms_cli, ["list"], redis_url)


def test_flag_oos_and_kpi_commands(redis_url, redis_client):
    run(alarmreport.alarms_cli, ["flag", "crate:3", "--comment", "HV off"], redis_url)
    assert alarms.flags(redis_client)["crate:3"]["comment"] == "HV off"
    run(alarmreport.alarms_cli, ["flag", "crate:3", "--off"], redis_url)
    assert alarms.flags(redis_client) == {}
    bad = CliRunner().invoke(main, ["alarms", "flag", "a b"], env={"MINARD_REDIS_URL": redis_url})
    assert bad.exit_code != 0
    run(alarmreport.alarms_cli, ["oos", "consumer_lag"], redis_url)
    assert "consumer_lag" in alarms.out_of_service(redis_client)
    alarms.raise_alarm(redis_client, 40, "x")
    k = json.loads(run(alarmreport.alarms_cli, ["kpi", "--hours", "1"], redis_url))
    assert k["raised"] == 1 and k["targets"]["per_10min"] == 1.0


def test_shift_summary_markdown_since_the_shift_started(redis_url, redis_client):
    now = time.time()
    roster.set_person(redis_client, "shifter", "Alice", "alice@example.org", now=now - 3600)
    alarms.raise_alarm(redis_client, 40, "before the shift", now=now - 7200)
    i = alarms.raise_alarm(redis_client, 40, "crate 7 | HV trip\nsecond line")
    alarms.acknowledge(redis_client, i, "alice", "called Bob")
    run(alarmreport.shift_cli, ["note", "crate 7 HV back at 02:10"], redis_url)
    md = run(alarmreport.shift_cli, ["summary", "--markdown"], redis_url)
    raised = md.split("### Alarms raised (1)")[1].split("###")[0]
    assert "before the shift" not in raised and "before the shift" in md.split("### Still open")[1]
    assert "crate 7 | HV trip second line" in md  # one line per alarm
    assert f"#{i}" in md and "by alice: called Bob" in md and "crate 7 HV back at 02:10" in md
    assert "On duty: shifter: Alice" in md and "no run registry installed" in md
    s = json.loads(run(alarmreport.shift_cli, ["summary", "--since", "3h"], redis_url))
    assert len(s["raised"]) == 2
    assert len(json.loads(run(alarmreport.shift_cli, ["summary", "--since", str(now - 60)], redis_url))["raised"]) == 1
    bad = CliRunner().invoke(main, ["shift", "summary", "--since", "yesterday"],
                             env={"MINARD_REDIS_URL": redis_url})
    assert bad.exit_code == 2 and "Unix seconds" in bad.output
