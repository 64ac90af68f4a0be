"""Random PMT records for tests, and their totals computed one event at a time.

The per-event totals are the reference that the vectorized aggregation
(``minard.analysis.aggregate``) and the pipeline are checked against.
"""

from collections import Counter

import numpy as np

from minard.formats.pmt import decode_event, encode_event, lcn


def make_records(n, seed=1, run=100, subrun=0, gtid0=1000, orphans=(), mean_nhit=30, words=None):
    """n records with random triggers (or *words* in turn) and hits (orphans at the given indices)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nh = int(rng.poisson(mean_nhit))
        hits = {"crate": rng.integers(0, 19, nh), "card": rng.integers(0, 16, nh),
                "channel": rng.integers(0, 32, nh), "qhs": rng.integers(0, 4096, nh)}
        word = int(rng.integers(0, 1 << 27)) & int(rng.integers(0, 1 << 27))
        if words is not None:
            word = words[i % len(words)]
        out.append(encode_event(run=run, subrun=subrun, evnum=i, gtid=(gtid0 + i) % (1 << 24),
                                trigger_word=word, hits=hits, orphan=i in orphans))
    return out


def expected(records):
    """Totals computed one event at a time with the single-record decoder."""
    trig = Counter()
    nhit_sum = Counter()
    qhs_sum = Counter()
    channels = Counter()
    nhist = Counter()
    orphans = 0
    for rec in records:
        ev = decode_event(rec)
        if ev["orphan"]:
            orphans += 1
            continue
        names = ev["triggers"] + ["TOTAL"]
        q = sum(h[4] for h in ev["hits"])
        for name in names:
            trig[name] += 1
            nhit_sum[name] += ev["nhit"]
            qhs_sum[name] += q
        nhist[ev["nhit"]] += 1
        for h in ev["hits"]:
            channels[int(lcn(h[0], h[1], h[2]))] += 1
    return dict(trig=trig, nhit=nhit_sum, qhs=qhs_sum, channels=channels, nhist=nhist, orphans=orphans)
