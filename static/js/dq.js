/* Run data-quality page: overlays of run vs reference from /api/runs/<run>/dq/overlay.
 * The report card and sign-off are rendered by the server; this draws the
 * trigger-rate table, the normalized nhit histograms and the occupancy-ratio map.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;

  function rates(tbody, triggers) {
    var rows = Object.keys(triggers).map(function (name) {
      var t = triggers[name];
      var ratio = t.run !== null && t.reference ? t.run / t.reference : null;
      return [name, MC.fmt(t.run, 4), MC.fmt(t.reference, 4), ratio === null ? "-" : MC.fmt(ratio, 3)];
    });
    tbody.replaceChildren();
    rows.forEach(function (r) {
      var tr = m.el("tr");
      tr.dataset.trigger = r[0];
      r.forEach(function (v, i) { tr.appendChild(m.el("td", i ? "num" : "", String(v))); });
      tbody.appendChild(tr);
    });
  }

  function nhitChart(el, nhit) {
    var last = 0;
    [nhit.run, nhit.reference || []].forEach(function (h) {
      h.forEach(function (v, i) { if (v > 0 && i > last) last = i; });
    });
    var x = nhit.bins.slice(0, last + 2);
    var series = [{ label: "nhit" }, { label: "run", stroke: "#d62728", paths: uPlot.paths.stepped({ align: 1 }) }];
    var data = [x, nhit.run.slice(0, last + 2)];
    if (nhit.reference) {
      series.push({ label: "reference", stroke: "#1f77b4", paths: uPlot.paths.stepped({ align: 1 }) });
      data.push(nhit.reference.slice(0, last + 2));
    }
    el.replaceChildren();
    new uPlot({ width: Math.max(300, el.clientWidth || 700), height: 300, series: series,
      scales: { x: { time: false } }, axes: [{ label: "nhit" }, { label: "fraction of events", size: 70 }] }, data, el);
    el.dataset.points = String(x.length);
  }

  function ratioMap(el, ratio) {
    var values = ratio || new Array(10240).fill(null);
    MC.channelMap(el, { values: values, hot: [], dead: [], unit: "run/reference", crate: null, card: null,
      onChannel: function (lcn) {
        var p = MC.parts(lcn);
        document.getElementById("dq-channel").textContent = "Channel " + p.crate + "/" + p.card + "/" + p.channel +
          " (lcn " + lcn + "): occupancy ratio " + MC.fmt(values[lcn], 4);
      } });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("dq-reference");
    if (!box) return;
    var url = "/api/runs/" + encodeURIComponent(box.dataset.run) + "/dq/overlay";
    if (box.dataset.reference) url += "?reference=" + encodeURIComponent(box.dataset.reference);
    m.getJSON(url).then(function (d) {
      rates(document.querySelector("#dq-rates tbody"), d.triggers);
      document.getElementById("dq-nhit-trigger").textContent = "of " + d.nhit.trigger + " events";
      nhitChart(document.getElementById("chart-dq-nhit"), d.nhit);
      ratioMap(document.getElementById("dq-map"), d.occupancy_ratio);
      document.body.dataset.overlayLoaded = String(d.run);
    }).catch(function (err) {
      document.getElementById("dq-channel").textContent = "Could not load the overlays: " + err.message;
    });
  });
})();
