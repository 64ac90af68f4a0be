/* Run page: nhit histogram and occupancy map of one run from /api/runs/<run>.
 * The tables are rendered by the server; this draws the charts.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;
  /** The nhit axis ends where this fraction of the run's events is reached (as on the Nhit page). */
  var FIT = 0.999;

  function nhitChart(el, hist) {
    var keys = Object.keys(hist).map(Number).sort(function (a, b) { return a - b; });
    var x = [], y = [];
    if (keys.length) {
      for (var n = keys[0]; n <= keys[keys.length - 1]; n++) { x.push(n); y.push(hist[String(n)] || 0); }
    }
    el.replaceChildren();
    var plot = new uPlot({
      width: Math.max(260, el.clientWidth || 700), height: 300,
      series: [{ label: "nhit" }, { label: "events", stroke: "#1f77b4", fill: "rgba(31,119,180,0.15)",
        paths: uPlot.paths.stepped({ align: 1 }) }],
      scales: { x: { time: false } }, axes: [{ label: "nhit" }, { label: "events", size: 70 }]
    }, [x, y], el);
    el.dataset.points = String(x.length);
    var bins = MC.fitBins(y, FIT);  // the axis fits 99.9 % of the events; drag or double-click to change
    var xmax = x.length ? x[x.length - 1] : 0;
    if (bins && bins[1] + 1 < x.length) {
      xmax = x[bins[1] + 1];
      plot.setScale("x", { min: x[bins[0]], max: xmax });
      var above = y.slice(bins[1] + 1).reduce(function (a, b) { return a + b; }, 0);
      var note = document.getElementById("run-nhit-range");
      if (note) note.textContent = "nhit " + x[bins[0]] + "\u2013" + x[bins[1] + 1] + " shown; " + above +
        " events above (double-click the plot for the full range)";
    }
    el.dataset.xmax = String(xmax);
    return plot;
  }

  function occupancyMap(el, run) {
    var values = new Array(10240).fill(run.events ? 0 : null);
    Object.keys(run.channel_hits).forEach(function (k) { values[+k] = run.channel_hits[k] / run.events; });
    MC.channelMap(el, {
      values: values, hot: [], dead: [], unit: "hits/event", crate: null, card: null,
      readout: document.getElementById("run-readout"),
      onChannel: function (lcn) {
        document.getElementById("run-channel").textContent = MC.channelName(lcn) +
          " (lcn " + lcn + "): " + (run.channel_hits[String(lcn)] || 0) + " hits, " + MC.fmt(values[lcn], 5) + " per event";
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("run-summary");
    if (!box) return;
    var run = box.dataset.run;
    m.getJSON("/api/runs/" + encodeURIComponent(run)).then(function (d) {
      nhitChart(document.getElementById("chart-run-nhit"), d.nhit_histogram);
      occupancyMap(document.getElementById("run-map"), d);
      var width = document.getElementById("run-map").clientWidth;
      window.addEventListener("resize", function () {
        var w = document.getElementById("run-map").clientWidth;
        if (Math.abs(w - width) > 8) { width = w; occupancyMap(document.getElementById("run-map"), d); }
      });
      document.body.dataset.runLoaded = String(d.run);
    }).catch(function (err) {
      document.getElementById("run-channel").textContent = "Could not load the run: " + err.message;
    });
  });
})();
