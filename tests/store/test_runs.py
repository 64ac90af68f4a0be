"""Run summaries in a real redis-server: exact combining, CLI output, retention."""

import json

from click.testing import CliRunner

from minard.analysis import aggregate as ag
from minard.cli import main
from minard.formats.pmt import decode_events
from minard.store.runs import RUN_KEEP, get_run, list_runs, run_key, write_run
from minard.testing.records import make_records

T0 = 1_700_000_000.0


def _aggs(records, t, parts=1):
    """Aggregate *records* as *parts* workers would (round robin batches of 25)."""
    workers = [ag.Aggregator() for _ in range(parts)]
    for k, i in enumerate(range(0, len(records), 25)):
        workers[k % parts].add_batch(decode_events(records[i:i + 25]), t + k)
    return workers


def _write(redis_client, workers, now=T0):
    for w in workers:
        _, runs, _ = w.take()
        pipe = redis_client.pipeline()
        for agg in runs.values():
            write_run(pipe, agg, now)
        pipe.execute()


def test_summary_written_by_several_workers_equals_the_single_worker_summary(redis_client):
    records = make_records(200, seed=11, run=7, subrun=2, orphans={3})
    ref = _aggs(records, T0)[0].runs[7].as_dict()
    _write(redis_client, _aggs(records, T0, parts=3))
    got = get_run(redis_client, 7)
    # Without the dispatcher's accounting the accounting fields are null.
    assert got == {**ref, "source_events": None, "dispatched": None, "dropped": None,
                   "dropped_by": {}, "unaccounted": None, "intervals": []}
    assert got["events"] == 199 and got["orphans"] == 1
    assert set(got["triggers"]) == set(ag.TRIGGER_NAMES) and len(got["triggers"]) == 27
    assert got["start"] == T0 and got["end"] == T0 + 7
    assert got["subruns"] == [2]


def test_start_is_the_earliest_and_end_the_latest_whatever_the_flush_order(redis_client):
    late, early = ag.Aggregator(), ag.Aggregator()
    late.add_batch(decode_events(make_records(3, run=5)), T0 + 50)
    early.add_batch(decode_events(make_records(3, run=5, seed=2)), T0 + 10)
    _write(redis_client, [late, early])
    got = get_run(redis_client, 5)
    assert (got["start"], got["end"], got["events"]) == (T0 + 10, T0 + 50, 6)


def test_unknown_run_is_none_and_runs_are_listed_newest_first(redis_client):
    assert get_run(redis_client, 999) is None
    a, b = ag.Aggregator(), ag.Aggregator()
    a.add_batch(decode_events(make_records(4, run=1)), T0)
    b.add_batch(decode_events(make_records(6, run=2, subrun=1)), T0 + 100)
    _write(redis_client, [a, b])
    rows = list_runs(redis_client)
    assert [r["run"] for r in rows] == [2, 1]
    assert rows[0]["events"] == 6 and rows[0]["subruns"] == 1


def test_run_keys_expire_after_a_year_or_more(redis_client):
    _write(redis_client, _aggs(make_records(10, run=3), T0))
    keys = redis_client.keys("*run*")
    assert {k.decode() for k in keys} >= {run_key(3), run_key(3, "nhit"), run_key(3, "channels"),
                                          run_key(3, "subruns"), "runs:start", "runs:end"}
    for key in keys:
        assert 365 * 86400 <= redis_client.ttl(key) <= RUN_KEEP


def test_channel_hits_are_one_compact_binary_array(redis_client):
    _write(redis_client, _aggs(make_records(50, run=4, mean_nhit=100), T0))
    assert redis_client.type(run_key(4, "channels")) == b"string"
    assert redis_client.strlen(run_key(4, "channels")) <= 10240 * 4


def test_cli_prints_the_same_object_as_get_run(redis_client, redis_url, monkeypatch):
    _write(redis_client, _aggs(make_records(30, run=8, subrun=4), T0))
    monkeypatch.setenv("MINARD_REDIS_URL", redis_url)
    runner = CliRunner()
    out = runner.invoke(main, ["runs", "show", "8", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == json.loads(json.dumps(get_run(redis_client, 8)))
    listing = runner.invoke(main, ["runs", "--json"])
    assert [r["run"] for r in json.loads(listing.output)] == [8]
    missing = runner.invoke(main, ["runs", "show", "12345", "--json"])
    assert missing.exit_code != 0 and "not known" in missing.output


def test_accounting_fields_follow_the_dispatcher_counters_and_unaccounted_is_never_negative(redis_client):
    from minard.store.runs import add_accounting

    _write(redis_client, _aggs(make_records(50, seed=3, run=8), T0))
    pipe = redis_client.pipeline()
    add_accounting(pipe, 8, {"source_events": 60, "dispatched": 55, "dropped:no_analyzer": 5,
                             "dropped:dispatcher_queue": 2})
    pipe.execute()
    got = get_run(redis_client, 8)
    assert (got["source_events"], got["dispatched"], got["events"], got["dropped"]) == (60, 55, 50, 7)
    assert got["dropped_by"] == {"dispatcher_queue": 2, "no_analyzer": 5}
    assert got["unaccounted"] == 3
    pipe = redis_client.pipeline()
    add_accounting(pipe, 8, {"dropped:analyzer_lost": 10})  # more counted than lost: clamped
    pipe.execute()
    assert get_run(redis_client, 8)["unaccounted"] == 0
    assert redis_client.ttl(run_key(8, "acct")) > 0


def test_orphans_and_corrupt_records_reached_redis_and_are_not_unaccounted(redis_client):
    """The dispatcher counts every record it received; orphans and corrupt records arrived too."""
    from minard.store.runs import add_accounting

    records = make_records(40, seed=4, run=9, orphans=(3, 7, 11))
    records[20] = records[20][:10]  # truncated: counted as corrupt by the pull
    _write(redis_client, _aggs(records, T0))
    got = get_run(redis_client, 9)
    assert got["orphans"] == 3 and got["events"] == 36
    pipe = redis_client.pipeline()
    add_accounting(pipe, 9, {"source_events": 40 + 2, "dispatched": 40, "dropped:no_analyzer": 1})
    pipe.execute()
    assert get_run(redis_client, 9)["unaccounted"] == 1  # 42 sent - 40 seen - 1 dropped


def test_recent_accounting_marks_a_run_whose_last_event_is_recent_as_in_flight(redis_client):
    """The Status page showed an open run's events on their way to Redis as unaccounted, in red."""
    from minard.store.runs import UNACCOUNTED_AFTER, add_accounting, recent_accounting

    _write(redis_client, _aggs(make_records(50, run=81), T0), now=T0)
    pipe = redis_client.pipeline()
    add_accounting(pipe, 81, {"source_events": 60, "dispatched": 60})
    pipe.execute()
    (row,) = recent_accounting(redis_client, now=T0 + 1)
    assert row["unaccounted"] == 10 and row["in_flight"]
    (row,) = recent_accounting(redis_client, now=T0 + UNACCOUNTED_AFTER + 1)
    assert row["unaccounted"] == 10 and not row["in_flight"]
