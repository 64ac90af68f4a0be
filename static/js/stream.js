/* Stream page: rates, average nhit and charge per trigger type, run/subrun/GTID, heartbeats.
 *
 * The view (window, triggers, log scale) lives in the URL.  A live view asks
 * the API every second for the buckets since its last one (same resolution)
 * and merges them; the API returns complete buckets only, so the newest point
 * never dips.  The headline rate is the API's mean over the last complete
 * seconds, labelled with the interval it covers.  Every 30 s the whole window
 * is reloaded to pick up new trigger types.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;
  var POLL_MS = 1000, FULL_MS = 30000;
  var tw, state = { data: null, charts: {}, names: [], hidden: {}, log: false, busy: false, lastFull: 0, timer: null };

  function apiParams(extra) {
    var p = Object.assign({}, tw.apiParams(), extra || {});
    var sel = MC.params().triggers;
    if (sel) p.triggers = sel;
    return p;
  }

  function saveUrl() {
    var p = Object.assign({}, tw.urlParams());
    var cur = MC.params();
    if (cur.triggers) p.triggers = cur.triggers;
    var hidden = Object.keys(state.hidden).filter(function (k) { return state.hidden[k]; });
    if (hidden.length) p.hide = hidden.join(",");
    if (state.log) p.log = "1";
    MC.setParams(p, tw.takePush());
    MC.setDownloads("/api/stream", apiParams());
    var link = document.getElementById("permalink");
    if (link) link.href = window.location.pathname + window.location.search;
    MC.showWindow(tw);
  }

  /** Build the three charts for the trigger names of the data. */
  function build(names) {
    state.names = names.slice();
    var marks = function () { return state.data ? state.data.boundaries : []; };
    var onZoom = function (a, b) { tw.setFixed(a, b); reload(); };
    var onZoomOut = function () { tw.zoomOut(); reload(); };
    [["rate", "chart-rate", "Hz", state.log], ["nhit", "chart-nhit", "nhit", false], ["qhs", "chart-qhs", "QHS", false]]
      .forEach(function (c) {
        var el = document.getElementById(c[1]);
        state.charts[c[0]] = MC.timeChart(el, { names: names, unit: c[2], log: c[3], marks: marks, onZoom: onZoom,
          onZoomOut: onZoomOut, styles: names.map(MC.style) });
        names.forEach(function (n, i) {
          if (state.hidden[n]) state.charts[c[0]].plot.setSeries(i + 1, { show: false });
        });
      });
    watchLegend();
  }

  /** Legend clicks hide/show a trigger in all charts and go into the URL (?hide=). */
  function watchLegend() {
    var rate = state.charts.rate.plot;
    rate.hooks.setSeries = rate.hooks.setSeries || [];
    rate.hooks.setSeries.push(function (u, i, opts) {
      if (i === null || !opts || opts.show === undefined) return;
      var name = state.names[i - 1];
      state.hidden[name] = !opts.show;
      ["nhit", "qhs"].forEach(function (k) { state.charts[k].plot.setSeries(i, { show: opts.show }); });
      saveUrl();
    });
  }

  function render() {
    var d = state.data;
    if (!d) return;
    var key = d.triggers.join(",");
    if (key !== state.names.join(",")) build(d.triggers);
    ["rate", "nhit", "qhs"].forEach(function (k) {
      state.charts[k].setData(d.t, d.triggers.map(function (n) { return d[k][n]; }));
    });
    var empty = d.t.length === 0 || d.rate.TOTAL && d.rate.TOTAL.every(function (v) { return v === null; });
    document.getElementById("stream-empty").hidden = !empty;
    document.body.dataset.streamPoints = String(d.t.length);
    table(d);
    panel(d);
  }

  function lastIndex(arr) {
    for (var i = arr.length - 1; i >= 0; i--) if (arr[i] !== null) return i;
    return -1;
  }

  /** "12:00:00–12:00:10 UTC" of an interval. */
  function interval(a, b) { return m.clock(a) + "\u2013" + m.clock(b) + " " + m.tzLabel(); }

  function table(d) {
    var last = d.t.length ? d.t[d.t.length - 1] : null;
    setText("table-interval", last === null ? "no complete bucket in this window" :
      interval(last, last + d.step) + " (" + MC.durationLabel(d.step) + " bucket)");
    var rows = d.triggers.map(function (n) {
      var i = lastIndex(d.rate[n]);
      return [n, i < 0 ? "-" : MC.fmt(d.rate[n][i]), i < 0 ? "-" : MC.fmt(d.nhit[n][i], 1), i < 0 ? "-" : MC.fmt(d.qhs[n][i], 0)];
    });
    MC.fillRows(document.getElementById("trigger-rows"), rows);
  }

  function panel(d) {
    var st = d.latest || {};
    setText("cur-run", st.run === null || st.run === undefined ? "-" : st.run);
    setText("cur-subrun", st.subrun === null || st.subrun === undefined ? "-" : st.subrun);
    setText("cur-gtid", st.gtid === null || st.gtid === undefined ? "-" : st.gtid + " (0x" + st.gtid.toString(16) + ")");
    var h = d.headline;
    setText("cur-rate", h ? MC.fmt(h.rates.TOTAL, 1) + " Hz" : "-");
    setText("cur-rate-note", h ? "mean of " + interval(h.start, h.stop) : "");
    setText("cur-age", st.time ? m.duration(d.now - st.time) + " ago" : "none in the last minute");
    setText("cur-dispatcher", d.dispatcher || "-");
    heartbeats(d.heartbeat || []);
  }

  function setText(id, text) { var n = document.getElementById(id); if (n) n.textContent = String(text); }

  function heartbeats(list) {
    var box = document.getElementById("heartbeats");
    if (!list.length) return;
    var frag = document.createDocumentFragment();
    list.forEach(function (h) {
      var span = m.el("span", "hb " + (h.alive ? "hb-up" : "hb-down"));
      span.dataset.name = h.name;
      // The age is that of the last heartbeat, not an uptime (the Status page has uptimes).
      span.textContent = h.name + (h.alive ? " up" : " down") +
        (h.age !== null ? " (heartbeat " + m.duration(h.age) + " ago)" : "");
      span.title = "last heartbeat " + (h.age !== null ? m.duration(h.age) + " ago" : "never");
      frag.appendChild(span);
    });
    box.replaceChildren(frag);
  }

  /** Merge a poll's buckets into the data (replacing buckets it repeats) and drop old ones. */
  function merge(upd) {
    var d = state.data;
    if (!upd.t.length) { d.latest = upd.latest; d.heartbeat = upd.heartbeat; d.now = upd.now; d.headline = upd.headline; return; }
    var first = upd.t[0], keep = 0;
    while (keep < d.t.length && d.t[keep] < first) keep++;
    var cutoff = upd.now - tw.span();
    var drop = 0;
    while (drop < keep && d.t[drop] < cutoff - d.step) drop++;
    function join(a, b) { return a.slice(drop, keep).concat(b); }
    d.t = join(d.t, upd.t);
    ["rate", "nhit", "qhs"].forEach(function (k) {
      d.triggers.forEach(function (n) { d[k][n] = join(d[k][n], upd[k][n] || upd.t.map(function () { return null; })); });
    });
    ["run", "subrun", "gtid"].forEach(function (k) { d[k] = join(d[k], upd[k]); });
    var seen = {};
    d.boundaries = d.boundaries.concat(upd.boundaries).filter(function (b) {
      var id = b.kind + b.run + ":" + b.subrun;
      if (seen[id] || b.t < d.t[0]) return false;
      seen[id] = true; return true;
    });
    d.latest = upd.latest; d.heartbeat = upd.heartbeat; d.now = upd.now; d.dispatcher = upd.dispatcher;
    d.headline = upd.headline; d.complete_until = upd.complete_until;
  }

  function reload() {
    saveUrl();
    state.busy = true;
    // compact answer (encoding=f64): the series as binary doubles, not ~30000 numbers written as text
    return m.getJSON("/api/stream?" + MC.query(apiParams({ encoding: "f64" }))).then(function (d) {
      ["rate", "nhit", "qhs"].forEach(function (key) {
        var packed = d[key + "_f64"] || {};
        d[key] = {};
        Object.keys(packed).forEach(function (n) { d[key][n] = MC.unpackF64(packed[n]); });
        delete d[key + "_f64"];
      });
      state.data = d;
      state.lastFull = Date.now();
      render();
      document.body.dataset.streamLoaded = String(Number(document.body.dataset.streamLoaded || 0) + 1);
    }).catch(showError).then(function () { state.busy = false; });
  }

  function poll() {
    if (!tw.live || state.busy || !state.data) return;
    if (Date.now() - state.lastFull > FULL_MS) { reload(); return; }
    var d = state.data, step = d.step;
    var from = d.t.length ? d.t[d.t.length - 1] - 2 * step : d.now - tw.span();
    from = Math.min(from, Date.now() / 1000 - Math.max(12, 3 * step));
    state.busy = true;
    var p = { start: Math.floor(from), step: step + "s", triggers: d.triggers.join(",") };
    m.getJSON("/api/stream?" + MC.query(p)).then(function (upd) {
      if (!tw.live || upd.step !== step) return;
      merge(upd);
      render();
      document.body.dataset.streamPolls = String(Number(document.body.dataset.streamPolls || 0) + 1);
    }).catch(showError).then(function () { state.busy = false; });
  }

  function showError(err) {
    var box = document.getElementById("stream-empty");
    box.hidden = false;
    box.textContent = "Could not load the data: " + err.message;
  }

  document.addEventListener("DOMContentLoaded", function () {
    var p = MC.params();
    tw = new MC.TimeWindow("10m");
    state.log = p.log === "1";
    (p.hide || "").split(",").forEach(function (n) { if (n) state.hidden[n] = true; });
    var log = document.getElementById("log-scale");
    log.checked = state.log;
    log.addEventListener("change", function () { state.log = log.checked; state.names = []; saveUrl(); render(); });
    MC.toolbar(tw, reload);
    document.addEventListener("minard:tz", function () { state.names = []; render(); });
    reload();
    state.timer = setInterval(poll, POLL_MS);
    window.addEventListener("resize", function () {
      Object.keys(state.charts).forEach(function (k) { state.charts[k].resize(); });
    });
  });
})();
