"""Every Redis key, key family, series group and retention level of minard, named once.

Processes and the web build key names only through this module, so one file answers
"what does minard keep in Redis, and who writes it".  ``docs/storage.md`` describes the
same schema for people; ``tests/store/test_schema.py`` checks that every family below
is documented there.

A :class:`Family` is a key template with ``{placeholders}``; ``Family.key(...)`` fills
them.  Plain constants are single keys.  Time-series *groups* are the last part of
``ts:`` keys (see :data:`SCALAR`) and name one hash of fields per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    """One resolution: buckets of ``step`` seconds kept for ``keep`` seconds."""

    step: int
    keep: int


@dataclass(frozen=True)
class Family:
    """A family of Redis keys: a template, its Redis type and what it holds."""

    template: str
    type: str
    doc: str

    def key(self, **parts: object) -> str:
        """The key of this family for the given placeholder values."""
        return self.template.format(**parts)

    @property
    def shape(self) -> str:
        """The key as docs show it: placeholders as ``<name>``, hash tags as the literal ``{...}``."""
        import string

        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        return self.template.format(**{name: f"<{name}>" for name in fields})

    @property
    def pattern(self) -> str:
        """A ``SCAN``/ACL glob matching every key of the family (hash tags kept literally)."""
        import string

        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        return self.template.format(**{name: "*" for name in fields})


HOUR, DAY = 3600, 86400

#: Single keys (not families): key -> (Redis type, what it holds).
_SINGLE: dict[str, tuple[str, str]] = {}


def _single(key: str, type_: str, doc: str) -> str:
    """Declare one fixed key with its type and content; returns the key."""
    _SINGLE[key] = (type_, doc)
    return key


# --- retention levels ------------------------------------------------------------
#: Scalar series: 1 s for 2 h ... 6 h buckets for 800 days.
SCALAR_LEVELS = (
    Level(1, 2 * HOUR),
    Level(10, 2 * DAY),
    Level(60, 14 * DAY),
    Level(600, 120 * DAY),
    Level(3600, 400 * DAY),
    Level(6 * HOUR, 800 * DAY),
)
#: Per-channel series (each bucket is a 10240-entry array, so fewer levels).
CHANNEL_LEVELS = (
    Level(10, 2 * HOUR),
    Level(300, 2 * DAY),
    Level(3600, 30 * DAY),
    Level(DAY, 400 * DAY),
)
#: nhit histograms: coarser than the scalar series (each bucket holds many bins).
NHIT_LEVELS = (Level(10, 2 * HOUR), Level(300, 2 * DAY), Level(3600, 30 * DAY))

# --- time series (minard/store/timeseries.py) ------------------------------------
#: Hash tag ``{<step>:<bucket>}`` (docs/storage.md, "Redis Cluster"): every key of one
#: (resolution, bucket), scalar and per-channel, is in one hash slot and written in one
#: transaction.
SCALAR = Family("ts:{{{step}:{bucket}}}:{group}", "hash",
                "Scalar series: one hash of fields per (resolution, bucket, group).")
CHANNEL = Family("ch:{{{step}:{bucket}}}:{name}", "string",
                 "Per-channel series: an array over the channels per (resolution, bucket, name); "
                 "averaged values keep ``<name>:sum`` and ``<name>:n`` arrays.")

#: Scalar-series groups (the ``{group}`` of :data:`SCALAR`).
GROUP_TRIGGERS = "trig"  # events, nhit and QHS sums per trigger type
GROUP_STREAM = "stream"  # record/event/hit/corruption counters; last run, subrun, GTID
GROUP_CRATES = "crate"  # hits per crate
GROUP_NHIT = "nhit"  # nhit histogram per trigger (NHIT_LEVELS)
GROUP_OCCUPANCY = "occ"  # events per bucket: the denominator of occupancy

#: Per-channel series names (the ``{name}`` of :data:`CHANNEL`).
CHANNEL_HITS = "hits"
CHANNEL_CARD_HITS = "card_hits"
CHANNEL_CMOS = "cmos"
CHANNEL_BASE = "base"
CHANNEL_BASE_BUSY = "base_busy"

# --- run summaries (minard/store/runs.py) ----------------------------------------
#: Hash tag ``{run:<run>}``: a run's summary and its parts (and its burst candidates) are
#: in one hash slot and written in one transaction.
RUN = Family("{{run:{run}}}", "hash", "Run summary: events, orphans, hits, trig:<NAME>.")
RUN_PART = Family("{{run:{run}}}:{part}", "hash, string, set or zset",
                  "Run summary parts: nhit (hash), channels (string array), subruns (set),"
                  " acct (hash: the dispatcher's event accounting, source_events, dispatched, dropped:<reason>),"
                  " nhit_trig (hash <NAME>:<lo> -> events, for the data-quality checks),"
                  " epochs (zset: dispatcher accounting journal -> epoch of its last write applied to the run),"
                  " intervals (hash <start>:<length>:<field>: the dispatcher's accounting per interval of"
                  " dispatcher_accounting_interval seconds: source_events, sent:<analyzer>, dropped:<reason>).")
RUNS_START = _single("runs:start", "zset", "run -> arrival time of its first event")
RUNS_END = _single("runs:end", "zset", "run -> arrival time of its last event")
RUNS_CLOCK_START = _single("runs:clock_start", "zset", "run -> lowest 10 MHz clock (ticks) of its events")
RUNS_CLOCK_END = _single("runs:clock_end", "zset", "run -> highest 10 MHz clock (ticks) of its events")
#: Hash field of a run summary counting one trigger type.
RUN_TRIGGER_FIELD = "trig:{name}"
#: Hash field of a run summary with one integrity counter (gtid_missing, corrupt, ...).
RUN_DQ_FIELD = "dq:{name}"

# --- data quality (minard/store/dq.py, registry.py, channel_status.py; docs/dq.md) -----
DQ_RESULT = Family("dq:result:{run}", "string", "Latest data-quality report of a run (JSON of minard dq --json).")
DQ_STATUS = _single("dq:status", "hash", "run -> status of its latest data-quality report")
DQ_RUN_TYPE = _single("dq:run_type", "hash", "run -> run type (absent: no type)")
DQ_REFERENCE = _single("dq:reference", "hash", "run type (none = no type) -> reference run chosen by an expert")
REGISTRY_STATE = _single("registry:state", "hash", "run -> JSON {state, who, when, comment} of its sign-off; never expires")
REGISTRY_HISTORY = Family("registry:history:{run}", "list",
                          "Every sign-off change of a run (JSON from, to, who, when, comment); appended only.")
CHANNELS_STATUS = _single("channels:status", "hash", "lcn -> JSON {flag: {reason, who, when}} of a flagged channel")
CHANNELS_HISTORY = _single("channels:history", "list", "every channel flag change (JSON); appended only")

# --- heartbeats and loss counters (minard/store/status.py) -----------------------
STATUS = Family("status:{component}", "hash", "Heartbeat of a pipeline component (expires).")
STATS = Family("stats:{stage}", "hash", "Counters of a pipeline stage: received, processed, dropped, errors; "
                "field <counter>|<writer> = that writer's absolute total (summed by readers).")
COMPONENTS = _single("pipeline:components", "set", "names of the pipeline components that have written a heartbeat")
POOL_STATUS = Family("status:pool:{pool}", "hash",
                     "Heartbeat of one consumer pool (pool = <host>:<manager pid>); kept a day after its last beat.")
POOLS = _single("pipeline:pools", "zset", "consumer pool <host>:<pid> -> time of its last heartbeat")
POOL_FLUSHED = Family("pool:{name}:{host}:{pid}:flushed", "hash",
                      "Records each worker of one pool has accounted for in Redis.")

#: Written in each slot group's transaction of a flush (minard/store/slots.py): the last flush
#: sequence number of that writer applied in that slot, so a retry after a lost reply applies nothing twice.
FLUSH_MARK = Family("flush:{{{tag}}}:{writer}", "string",
                    "Last flush (sequence number) of one writer applied in the hash slot of tag; expires "
                    "after 10 min.")

# --- ORCA stream (minard/pipeline/orca_cmos.py, orca_base.py) ----------------------
#: Redis Cluster hash tags (docs/storage.md, "Redis Cluster"): the keys of one WATCH/MULTI
#: transaction share a tag, so they share a hash slot.  ``{cmos}``: the per-crate CMOS
#: states and the CMOS latest map, written together under WATCH by every CMOS worker.
ORCA_CMOS_STATE = Family("orca:{{cmos}}:state:{crate}", "string",
                         "CMOS rate state of one crate: last valid count and its time per channel.")
#: Latest value per channel of an ORCA stream (``cmos`` or ``base``):
#: big-endian float64 per channel, NaN = no valid value.  Hash tag ``{<stream>}``.
ORCA_LATEST_KEY = "orca:{{{stream}}}:latest"
#: Arrival time (Unix s) of each channel's latest value: big-endian float64.
ORCA_LATEST_TIME_KEY = "orca:{{{stream}}}:latest_t"
ORCA_LATEST = Family(ORCA_LATEST_KEY, "string", "Latest value per channel of an ORCA stream.")
ORCA_LATEST_TIME = Family(ORCA_LATEST_TIME_KEY, "string", "Arrival time of each channel's latest value.")
ORCA_BASE_BUSY = _single("orca:{base}:busy", "string", "uint8 per channel: busy flag at the latest base-current reading")
ORCA_BASE_CRATE_TIME = _single("orca:{base}:crate_time", "hash", "crate -> ORCA time (µs) of the reading in the base latest map")

# --- dispatcher (minard/dispatcher/server.py) ------------------------------------
DISPATCHER_SCALERS = Family("dispatcher:scalers:{run}", "hash", "Scaler sums of one run (SCALERREC).")
DISPATCHER_SCALER_RUNS = _single("dispatcher:scaler_runs", "zset", "runs that have scaler records")

# --- the website's shared cache (minard/web/data.py) ------------------------------
WEB_BLOCK = Family("webcache:rows:{step}:{block}:{group}:{fields}", "string",
                   "Settled scalar rows of one block of buckets, decoded once for every web worker: float64 "
                   "array (buckets x fields, NaN where absent); fields is a digest of the field list. Expires "
                   "after a day.")
WEB_BASELINE = Family("webcache:base:{quantity}:{step}:{anchor}:{span}", "string",
                      "Rolling baseline of the Detector page (per-channel median of the windows of length span "
                      "before anchor), computed once for every web worker when all its buckets are settled: "
                      "float64 per channel. Expires after a day.")
WEB_SUM = Family("webcache:sum:{name}:{step}:{block}", "string",
                 "Per-channel sums over one aligned block of 8 settled buckets of a per-channel array (name as "
                 "in ch:…; the Detector page's 10-minute maps add about 7 of them instead of 61 buckets), computed "
                 "once for every web worker: int64 sum per channel, for averaged values followed by the int64 "
                 "count per channel. The warmer stores those of the occupancy hits of the last web_warm_hours (80 KiB a "
                 "block, 90 blocks for the 2 hours of the 10 s level). Expires after a day.")
WEB_WARM_LOCK = _single("webcache:warm", "string",
                        "held (a minute at most) by the one web worker filling webcache:rows ahead of requests")

# --- alarms (minard/store/alarms.py) ---------------------------------------------
ALARM = Family("minard:alarm:{id}", "hash", "One alarm: level, message, source, states and their times.")
ALARM_PREFIX = "minard:alarm:"  # ALARM without its id, for the Lua script that raises alarms
ALARM_GROUP = Family("minard:alarms:group:{digest}", "string",
                     "The open alarm of one grouping key (sha1 of the key).")
ALARMS_NEXT = _single("minard:alarms:next", "string", "counter: the last alarm id given out")
ALARMS_INDEX = _single("minard:alarms:index", "zset", "alarm id -> time it was raised")
ALARMS_COUNTERS = _single("minard:alarms:counters", "hash", "totals of alarms raised, acknowledged, shelved")
ALARM_LOG = Family("minard:alarm:{id}:log", "list",
                   "Transitions of one alarm (JSON: t, action, who, comment); expires with the alarm.")
ALARMS_OOS = _single("minard:alarms:oos", "hash", "alarm definition name -> JSON who/when/comment while out of service")
ALARMS_FLAGS = _single("minard:alarms:flags", "hash",
                       "suppression flag (crate:N, run_type:NAME) -> JSON who/when/comment while set")

# --- alarm notifications, roster, shift, staleness (minard/ops/notify.py, alarmreport.py, monitors.py)
ROSTER = _single("minard:roster", "hash", "on-call role (shifter, expert, supernova) -> JSON name, email, by, at")
NOTIFY_SENT = _single("minard:notify:sent", "hash", "ALARM:ROLE -> time of the last notification (rate limit)")
SHIFT_NOTE = _single("minard:shift:note", "string", "JSON handover note of the shift: text, by, at")
STREAM_SEEN = _single("minard:alarms:stream_seen", "hash",
                      "pipeline stage -> 'processed:time' its processed counter last moved (staleness monitor)")

# --- supernova burst monitor (minard/store/bursts.py) ------------------------------
BURST_EVENTS = Family("minard:burst:ev:{{run:{run}}}:{bucket}", "string",
                      "Selected events (clock10 u8, GTID u4, nhit u2) of a run's 10 s clock bucket; expires 1 h.")
BURST_BACKGROUND = Family("minard:burst:bg:{{run:{run}}}", "hash", "clock second -> selected events of a run (background).")
BURST = Family("minard:burst:{id}", "string", "JSON burst record: run, gtid_first, gtid_last, start, end, count, window.")
BURST_RECORD_EVENTS = Family("minard:burst:{id}:events", "string", "The events of one burst record (as BURST_EVENTS).")
BURSTS_INDEX = _single("minard:bursts:index", "zset", "burst id -> start time (Unix s)")
BURSTS_NEXT = _single("minard:bursts:next", "string", "counter: the last burst id given out")
BURSTS_LOCK = _single("minard:bursts:lock", "string", "short lock serialising merges of overlapping burst records")

# --- operations: program heartbeats and metrics (minard/ops/programs.py) ---------
OPS_HEARTBEAT = Family("minard:ops:hb:{program}", "hash", "Heartbeat of a registered program (log server).")
OPS_METRICS = Family("minard:ops:metrics:{program}", "hash", "Metrics a program posted with its heartbeat.")

# --- website (minard/store/sessions.py, minard/web/auth.py) ----------------------
WEB_SESSION = Family("minard:web:session:{digest}", "hash",
                     "A login session (user, credentials' generation, login time), by the SHA-256 of its "
                     "cookie id; expires after the idle lifetime.")
WEB_LIMITS = Family("minard:web:limits:{limit}", "string or zset",
                    "Flask-Limiter's counters of failed logins per client address and per user name.")
WEB_COUNTERS = _single("minard:web:counters", "hash", "the website's security counters: login_failed, login_limited")


def families() -> dict[str, Family]:
    """Every key family of this module by its constant name (for docs and ACL checks)."""
    return {name: value for name, value in globals().items() if isinstance(value, Family)}


def single_keys() -> dict[str, tuple[str, str]]:
    """Every single key (not a family): key -> (Redis type, content)."""
    return dict(_SINGLE)


def doc_table() -> str:
    """The key index of docs/storage.md, generated from this module (a test keeps it current)."""
    rows = ["| key | type | content |", "|---|---|---|"]
    for family in families().values():
        rows.append(f"| `{family.shape}` | {family.type} | {family.doc} |")
    for key, (type_, doc) in single_keys().items():
        rows.append(f"| `{key}` | {type_} | {doc} |")
    return "\n".join(rows) + "\n"
