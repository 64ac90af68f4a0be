/* Nhit page: nhit distribution over the last N seconds per trigger type.
 * URL: ?seconds=60&triggers=TOTAL,100L&log=1&logx=1&full=1.  Refreshed every 2 s.
 * The x axis fits the data (the bins holding 99.9 % of the events shown)
 * unless "full range" is ticked; log scales for either axis.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;
  var REFRESH_MS = 2000;
  var st = { seconds: "60", triggers: [], log: false, logx: false, full: false, chart: null, key: "" };
  /** The x axis ends where this fraction of the events shown is reached (unless "full range"). */
  var FIT = 0.999;

  function apiParams() {
    var p = { seconds: st.seconds };
    if (st.triggers.length) p.triggers = st.triggers.join(",");
    return p;
  }

  function saveUrl() {
    MC.setParams(Object.assign(apiParams(), { log: st.log ? "1" : null, logx: st.logx ? "1" : null,
      full: st.full ? "1" : null }));
    MC.setDownloads("/api/nhit", apiParams());
    document.getElementById("permalink").href = window.location.pathname + window.location.search;
    document.querySelectorAll("button[data-seconds]").forEach(function (b) {
      b.classList.toggle("active", b.dataset.seconds === st.seconds);
    });
    document.getElementById("window-label").textContent = "last " + MC.durationLabel(+st.seconds);
  }

  /** [lowest, highest] nhit shown: the bins holding FIT of the events (all with "full range"). */
  function fitRange(d) {
    var n = d.nhit.length, sums = new Array(n).fill(0);
    d.triggers.forEach(function (t) { d.counts[t].forEach(function (v, i) { sums[i] += v; }); });
    var bins = MC.fitBins(sums, FIT);
    if (!bins || st.full) return [st.logx ? d.bin / 2 : 0, (d.nhit[n - 1] || 0) + d.bin];
    var lo = bins[0], hi = bins[1];
    var left = st.logx ? Math.max(d.bin / 2, d.nhit[lo]) : Math.max(0, d.nhit[lo] - d.bin);
    return [left, d.nhit[Math.min(n - 1, hi + 1)] + d.bin];
  }

  function render(d) {
    var key = d.triggers.join(",") + (st.log ? ":log" : "") + (st.logx ? ":logx" : "");
    var el = document.getElementById("chart-nhit-dist");
    if (key !== st.key || !st.chart) {
      st.chart = makeChart(el, d.triggers);
      el.uplot = st.chart;  // the tests read series styles from it
      st.key = key;
    }
    var xr = fitRange(d);
    st.range = xr;
    var xs = d.nhit.map(function (x) { return st.logx ? x + d.bin / 2 : x; });
    st.chart.setData([xs].concat(d.triggers.map(function (n) {
      return d.counts[n].map(function (v) { return st.log && v <= 0 ? null : v; });
    })), false);
    st.chart.setScale("x", { min: xr[0], max: xr[1] });
    el.dataset.xmax = String(xr[1]);
    var over = 0;
    d.triggers.forEach(function (t) { d.counts[t].forEach(function (v, i) { if (d.nhit[i] >= xr[1]) over += v; }); });
    document.getElementById("nhit-range").textContent = "nhit " + Math.round(xr[0]) + "\u2013" + Math.round(xr[1]) +
      (over ? "; " + over + " events above (tick \u201cfull range\u201d)" : "");
    el.dataset.points = String(d.nhit.length);
    var total = 0;
    var rows = d.triggers.map(function (n) {
      var c = d.counts[n], ev = 0, sum = 0;
      for (var i = 0; i < c.length; i++) { ev += c[i]; sum += c[i] * (d.nhit[i] + d.bin / 2); }
      total += ev;
      return [n, String(ev), ev ? MC.fmt(sum / ev, 1) : "-"];
    });
    MC.fillRows(document.getElementById("nhit-rows"), rows);
    document.getElementById("nhit-empty").hidden = total > 0;
    document.body.dataset.nhitLoaded = String(Number(document.body.dataset.nhitLoaded || 0) + 1);
  }

  function makeChart(el, names) {
    el.replaceChildren();
    var series = [{ label: "nhit" }].concat(names.map(function (n) {
      var sty = MC.style(n);
      var s = { label: n, stroke: sty.stroke, width: sty.width, paths: uPlot.paths.stepped({ align: 1 }) };
      if (sty.dash) s.dash = sty.dash;
      return s;
    }));
    return new uPlot({
      width: Math.max(260, el.clientWidth || 900), height: 360, series: series,
      scales: { x: st.logx ? { time: false, distr: 3, auto: false } : { time: false, auto: false },
        y: st.log ? { distr: 3 } : { auto: true } },
      axes: [{ label: "nhit" + (st.logx ? " (log)" : ""), space: 60 }, { label: "events", size: 70 }]
    }, [[]].concat(names.map(function () { return []; })), el);
  }

  function load() {
    saveUrl();
    m.getJSON("/api/nhit?" + MC.query(apiParams())).then(render).catch(function (err) {
      var box = document.getElementById("nhit-empty");
      box.hidden = false;
      box.textContent = "Could not load the data: " + err.message;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var p = MC.params();
    if (/^\d+[smhd]?$/.test(p.seconds || "")) st.seconds = p.seconds;
    st.log = p.log === "1";
    st.logx = p.logx === "1";
    st.full = p.full === "1";
    st.triggers = (p.triggers || "").split(",").filter(function (x) { return x; });
    document.querySelectorAll("#trigger-picks input").forEach(function (box) {
      box.checked = st.triggers.indexOf(box.value) >= 0;
      box.addEventListener("change", function () {
        st.triggers = Array.prototype.filter.call(document.querySelectorAll("#trigger-picks input"),
          function (b) { return b.checked; }).map(function (b) { return b.value; });
        load();
      });
    });
    document.querySelectorAll("button[data-seconds]").forEach(function (b) {
      b.addEventListener("click", function () { st.seconds = b.dataset.seconds; load(); });
    });
    var log = document.getElementById("log-scale");
    log.checked = st.log;
    log.addEventListener("change", function () { st.log = log.checked; load(); });
    [["log-x", "logx"], ["nhit-full", "full"]].forEach(function (pair) {
      var box = document.getElementById(pair[0]);
      box.checked = st[pair[1]];
      box.addEventListener("change", function () { st[pair[1]] = box.checked; load(); });
    });
    load();
    setInterval(load, REFRESH_MS);
  });
})();
