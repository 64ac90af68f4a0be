"""The status banner shown on every page: run, run state, rate, data age, alarms.

One small JSON document (``GET /api/banner``) that every page polls, so the
shift crew sees the state of the detector from whatever page they are on
(like the status header of MIDAS).  Built from the store only:

* run number, its start (``runs:start``) and so its elapsed time;
* data age: seconds since the last bucket holding data (the ``stream``
  series of the last minute, else the end of the newest run);
* run state: ``running`` while data arrives, ``stalled`` when the data is
  :data:`AMBER_SECONDS` old, ``no data`` past :data:`RED_SECONDS`;
* total rate: the headline (mean over the last complete seconds, with the
  interval it covers, :func:`minard.web.data.headline`);
* alarms: how many are active and not acknowledged, and the worst level.
"""

from __future__ import annotations

from minard.store import alarms, schema
from minard.store.runs import list_runs
from minard.web import data

#: Alarm states (ISA-18.2, minard.store.alarms) the banner counts: active and not acknowledged.
UNACKNOWLEDGED = ("unacknowledged", "rtn_unacknowledged")
#: Data older than this (seconds) turns the banner's data age amber ...
AMBER_SECONDS = 10.0
#: ... and this red.
RED_SECONDS = 60.0


def data_age_class(age: float | None) -> str:
    """``ok``, ``amber`` or ``red`` for a data age in seconds (None = no data at all)."""
    if age is None or age >= RED_SECONDS:
        return "red"
    return "amber" if age >= AMBER_SECONDS else "ok"


def run_state(age: float | None) -> str:
    """What the data flow says about the run: running, stalled or no data."""
    cls = data_age_class(age)
    return {"ok": "running", "amber": "stalled"}.get(cls, "no data")


def banner(redis, now: float, history_days: float = 30) -> dict:
    """The banner's fields at *now* (see the module docstring)."""
    latest = data.latest_state(redis, now)
    newest = list_runs(redis, 1)
    run = latest["run"] if latest["run"] is not None else (newest[0]["run"] if newest else None)
    last_data = latest["time"] + 1 if latest["time"] is not None else None
    if last_data is None and newest and newest[0]["end"]:
        last_data = float(newest[0]["end"])
    age = max(0.0, now - last_data) if last_data is not None else None
    start = redis.zscore(schema.RUNS_START, str(run)) if run is not None else None
    head = data.headline(redis, now)
    active = [a for a in alarms.list_alarms(redis, now, 500, history_days) if a["state"] in UNACKNOWLEDGED]
    worst = max(active, key=lambda a: a["level"]) if active else None
    return {
        "now": now, "run": run, "subrun": latest["subrun"], "gtid": latest["gtid"],
        "run_start": float(start) if start is not None else None,
        "elapsed": (now - float(start)) if start is not None else None,
        "state": run_state(age), "data_age": age, "data_class": data_age_class(age),
        "amber_seconds": AMBER_SECONDS, "red_seconds": RED_SECONDS,
        "rate": head["rates"]["TOTAL"], "rate_start": head["start"], "rate_stop": head["stop"],
        "rate_seconds": head["seconds"],
        "alarms": {"active": len(active), "worst": worst["level_name"] if worst else None,
                   "worst_level": worst["level"] if worst else None},
    }
