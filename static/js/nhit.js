/* Nhit page: nhit distribution over the last N seconds per trigger type.
 * URL: ?seconds=60&triggers=TOTAL,100L&log=1.  Refreshed every 2 s.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;
  var REFRESH_MS = 2000;
  var st = { seconds: "60", triggers: [], log: false, chart: null, key: "" };

  function apiParams() {
    var p = { seconds: st.seconds };
    if (st.triggers.length) p.triggers = st.triggers.join(",");
    return p;
  }

  function saveUrl() {
    MC.setParams(Object.assign(apiParams(), { log: st.log ? "1" : null }));
    MC.setDownloads("/api/nhit", apiParams());
    document.getElementById("permalink").href = window.location.pathname + window.location.search;
    document.querySelectorAll("button[data-seconds]").forEach(function (b) {
      b.classList.toggle("active", b.dataset.seconds === st.seconds);
    });
    document.getElementById("window-label").textContent = "last " + MC.durationLabel(+st.seconds);
  }

  function render(d) {
    var key = d.triggers.join(",") + (st.log ? ":log" : "");
    var el = document.getElementById("chart-nhit-dist");
    if (key !== st.key || !st.chart) {
      st.chart = makeChart(el, d.triggers);
      st.key = key;
    }
    st.chart.setData([d.nhit].concat(d.triggers.map(function (n) {
      return d.counts[n].map(function (v) { return st.log && v <= 0 ? null : v; });
    })));
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
    var series = [{ label: "nhit" }].concat(names.map(function (n, i) {
      return { label: n, stroke: n === "TOTAL" ? "#000" : MC.color(i), width: 1.5,
        paths: uPlot.paths.stepped({ align: 1 }) };
    }));
    return new uPlot({
      width: Math.max(300, el.clientWidth || 900), height: 360, series: series,
      scales: { x: { time: false }, y: st.log ? { distr: 3 } : { auto: true } },
      axes: [{ label: "nhit" }, { label: "events", size: 70 }]
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
    load();
    setInterval(load, REFRESH_MS);
  });
})();
