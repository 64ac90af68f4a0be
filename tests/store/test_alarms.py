"""Alarms in a real Redis: grouping, acknowledge, shelve with expiry, history, thresholds."""

from __future__ import annotations

import pytest

from minard.store import alarms
from minard.store.alarms import Threshold

T0 = 1_700_000_000.0


def test_levels_have_names_and_distinct_colours():
    assert [alarms.level_name(lv) for lv in (10, 20, 21, 30, 40, 50)] == [
        "debug", "info", "success", "warning", "danger", "danger"]
    assert len({alarms.level_colour(lv) for lv in (10, 20, 21, 30, 40)}) == 5
    assert alarms.parse_level("error") == 40 and alarms.parse_level("21") == 21
    for bad in ("loud", 51, -1, True, 2.5):
        with pytest.raises(ValueError):
            alarms.parse_level(bad)


def test_raised_alarm_is_listed_active_and_rings_at_danger(redis_client):
    i = alarms.raise_alarm(redis_client, 40, "crate 3 HV trip", source="log", program="orca", now=T0)
    a = alarms.get(redis_client, i, now=T0)
    assert a["state"] == "unacknowledged" and a["ringing"] and a["count"] == 1
    assert a["level_name"] == "danger" and a["program"] == "orca"
    assert [x["id"] for x in alarms.list_alarms(redis_client, now=T0)] == [i]


def test_warning_does_not_ring(redis_client):
    i = alarms.raise_alarm(redis_client, 30, "disk 85% full", now=T0)
    assert not alarms.get(redis_client, i, now=T0)["ringing"]


def test_repeated_identical_alarms_are_grouped_with_count_and_last_seen(redis_client):
    ids = {alarms.raise_alarm(redis_client, 40, "same", program="p", now=T0 + k) for k in range(5)}
    assert len(ids) == 1
    a = alarms.get(redis_client, ids.pop(), now=T0 + 5)
    assert a["count"] == 5 and a["first"] == T0 and a["last"] == T0 + 4
    assert len(alarms.list_alarms(redis_client, now=T0 + 5)) == 1


def test_different_messages_levels_or_programs_are_separate_alarms(redis_client):
    r = redis_client
    ids = {alarms.raise_alarm(r, 40, "a", program="p", now=T0),
           alarms.raise_alarm(r, 40, "b", program="p", now=T0),
           alarms.raise_alarm(r, 30, "a", program="p", now=T0),
           alarms.raise_alarm(r, 40, "a", program="q", now=T0)}
    assert len(ids) == 4


def test_acknowledge_records_who_when_comment_and_stops_ringing(redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x", now=T0)
    a = alarms.acknowledge(redis_client, i, "alice", "called the expert", now=T0 + 60)
    assert (a["state"], a["ack_by"], a["ack_at"], a["ack_comment"]) == (
        "acknowledged", "alice", T0 + 60, "called the expert")
    assert not a["ringing"]
    with pytest.raises(ValueError, match="already acknowledged"):
        alarms.acknowledge(redis_client, i, "bob", now=T0 + 61)


def test_repeat_after_acknowledge_opens_a_new_alarm(redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x", now=T0)
    alarms.acknowledge(redis_client, i, "alice", now=T0 + 1)
    j = alarms.raise_alarm(redis_client, 40, "x", now=T0 + 2)
    assert j != i and alarms.get(redis_client, j, now=T0 + 2)["ringing"]
    assert alarms.get(redis_client, i, now=T0 + 2)["count"] == 1


def test_shelve_needs_a_future_bounded_expiry(redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x", now=T0)
    with pytest.raises(ValueError, match="expiry"):
        alarms.shelve(redis_client, i, "alice", None, now=T0)
    with pytest.raises(ValueError, match="future"):
        alarms.shelve(redis_client, i, "alice", T0 - 1, now=T0)
    with pytest.raises(ValueError, match="at most 72"):
        alarms.shelve(redis_client, i, "alice", T0 + 73 * 3600, now=T0)
    with pytest.raises(LookupError):
        alarms.shelve(redis_client, 999, "alice", T0 + 60, now=T0)


def test_shelved_alarm_is_silent_groups_repeats_and_rings_again_after_expiry(redis_client):
    r = redis_client
    i = alarms.raise_alarm(r, 40, "x", now=T0)
    a = alarms.shelve(r, i, "alice", T0 + 600, "known, expert on it", now=T0 + 1)
    assert a["state"] == "shelved" and not a["ringing"] and a["shelved_by"] == "alice"
    assert alarms.raise_alarm(r, 40, "x", now=T0 + 300) == i
    assert alarms.get(r, i, now=T0 + 300)["state"] == "shelved"
    after = alarms.get(r, i, now=T0 + 601)
    assert after["state"] == "unacknowledged" and after["ringing"] and after["shelve_expired"]
    assert after["count"] == 2


def test_unshelve_makes_the_alarm_active_at_once(redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x", now=T0)
    alarms.shelve(redis_client, i, "alice", T0 + 600, now=T0)
    a = alarms.unshelve(redis_client, i, "bob", now=T0 + 10)
    assert a["state"] == "unacknowledged" and not a["shelve_expired"]  # reads "unacknowledged", not "active (shelve expired)"
    assert alarms.get(redis_client, i, now=T0 + 700)["shelve_expired"] is False


def test_a_shelve_that_runs_out_reads_expired(redis_client):
    i = alarms.raise_alarm(redis_client, 40, "x", now=T0)
    alarms.shelve(redis_client, i, "alice", T0 + 600, now=T0)
    a = alarms.get(redis_client, i, now=T0 + 601)
    assert a["state"] == "unacknowledged" and a["shelve_expired"]


def test_history_is_kept_for_the_configured_days_then_trimmed(redis_client):
    r = redis_client
    i = alarms.raise_alarm(r, 20, "old", now=T0, history_days=30)
    assert r.ttl(alarms.alarm_key(i)) > 29 * 86400
    assert [a["id"] for a in alarms.list_alarms(r, now=T0 + 29 * 86400, history_days=30)] == [i]
    assert alarms.list_alarms(r, now=T0 + 31 * 86400, history_days=30) == []


def test_summary_counts_ringing_alarms(redis_client):
    r = redis_client
    alarms.raise_alarm(r, 40, "a", now=T0)
    alarms.raise_alarm(r, 30, "b", now=T0)
    j = alarms.raise_alarm(r, 40, "c", now=T0)
    alarms.shelve(r, j, "alice", T0 + 60, now=T0)
    s = alarms.summary(r, now=T0 + 1)
    assert (s["active"], s["ringing"], s["shelved"]) == (2, 1, 1)


def test_threshold_zero_trigger_rate_raises_one_grouped_alarm(redis_client):
    r = redis_client
    t = [Threshold("trigger_rate", zero=True, level=40, label="trigger rate")]
    assert alarms.check_thresholds(r, {"trigger_rate": 12.0}, t, now=T0) == []
    a1 = alarms.check_thresholds(r, {"trigger_rate": 0.0}, t, program="dispatcher", now=T0 + 1)
    a2 = alarms.check_thresholds(r, {"trigger_rate": 0}, t, program="dispatcher", now=T0 + 2)
    assert a1 == a2 and len(a1) == 1
    a = alarms.get(r, a1[0], now=T0 + 2)
    assert a["message"] == "dispatcher: trigger rate is zero" and a["count"] == 2


def test_threshold_above_groups_even_when_the_value_changes(redis_client):
    r = redis_client
    t = [Threshold("lag", above=5.0, label="consumer lag")]
    first = alarms.check_thresholds(r, {"lag": 7.5}, t, now=T0)
    second = alarms.check_thresholds(r, {"lag": 9.0}, t, now=T0 + 10)
    assert first == second
    assert alarms.get(r, first[0], now=T0 + 10)["message"] == "consumer lag is 9, above 5"
    assert alarms.check_thresholds(r, {"lag": 1.0, "other": 99}, t, now=T0) == []


def test_threshold_moving_counter_alarms_only_when_it_increases(redis_client):
    r = redis_client
    t = [Threshold("lost", moving=True, level=40, label="events lost")]
    assert alarms.check_thresholds(r, {"lost": 3}, t, now=T0) == []  # first sight: baseline
    assert alarms.check_thresholds(r, {"lost": 3}, t, now=T0 + 1) == []
    ids = alarms.check_thresholds(r, {"lost": 10}, t, now=T0 + 2)
    assert alarms.get(r, ids[0], now=T0 + 2)["message"] == "events lost increased by 7 to 10"
    assert alarms.check_thresholds(r, {}, t, now=T0 + 3) == []
