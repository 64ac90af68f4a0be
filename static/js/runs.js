/* Run page: nhit histogram and occupancy map of one run from /api/runs/<run>.
 * The tables are rendered by the server; this draws the charts.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;

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
