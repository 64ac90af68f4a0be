/* Detector page: channel map of occupancy, CMOS rate or base current with
 * crate -> card -> channel drill-down and a channel's history of all three.
 *
 * URL: ?quantity=cmos&window=1h (or start/stop) &crate=3&card=4&lcn=1669.
 * A live view reloads the map every REFRESH_MS.
 */
(function () {
  "use strict";
  var m = window.minard, MC = window.MC;
  var REFRESH_MS = 10000;
  var tw, view = { quantity: "occupancy", crate: null, card: null, lcn: null, pushed: false }, map = null, busy = false;

  function intParam(p, k, max) {
    var v = p[k];
    if (v === undefined || !/^\d+$/.test(v) || +v > max) return null;
    return +v;
  }

  function apiParams() { return Object.assign({ quantity: view.quantity }, tw.apiParams()); }

  function saveUrl() {
    var p = Object.assign({ quantity: view.quantity }, tw.urlParams(),
      { crate: view.crate, card: view.card, lcn: view.lcn });
    MC.setParams(p, tw.takePush() || view.pushed);
    view.pushed = false;
    var dl = apiParams();
    if (view.crate !== null) dl.crate = view.crate;
    if (view.card !== null) dl.card = view.card;
    MC.setDownloads("/api/detector", dl);
    document.getElementById("permalink").href = window.location.pathname + window.location.search;
    MC.showWindow(tw);
  }

  function crumbs() {
    var nav = document.getElementById("crumbs");
    var items = [["Detector", function () { select(null, null); }]];
    if (view.crate !== null) items.push(["Crate " + view.crate, function () { select(view.crate, null); }]);
    if (view.card !== null) items.push(["Card " + view.card, function () { select(view.crate, view.card); }]);
    var frag = document.createDocumentFragment();
    items.forEach(function (it, i) {
      if (i) frag.appendChild(document.createTextNode(" \u203a "));
      var a = m.el("a", "crumb", it[0]);
      a.href = "#";
      a.addEventListener("click", function (e) { e.preventDefault(); it[1](); });
      frag.appendChild(a);
    });
    nav.replaceChildren(frag);
  }

  function select(crate, card) {
    view.crate = crate; view.card = card; view.pushed = true;
    saveUrl(); draw();
  }

  function draw() {
    crumbs();
    if (!map) return;
    MC.channelMap(document.getElementById("map"), {
      values: map.values, baseline: map.baseline, hot: map.hot, dead: map.dead, flags: map.flags, unit: map.unit,
      crate: view.crate, card: view.card, readout: document.getElementById("map-readout"), cursor: view.lcn,
      onCrate: function (c) { select(c, null); },
      onCard: function (c, k) { select(c, k); },
      onChannel: openChannel
    });
    document.getElementById("map").dataset.view = view.card !== null ? "card" : view.crate !== null ? "crate" : "detector";
    stats();
    lists();
    var info = map.quantity + " over " + tw.describe() + " (" + MC.durationLabel(map.step) + " buckets)";
    if (map.events !== null) info += ", " + map.events + " events";
    document.getElementById("map-info").textContent = info;
    document.body.dataset.mapLoaded = String(Number(document.body.dataset.mapLoaded || 0) + 1);
  }

  /** The crate/card/channel table: headers that match their columns, one precision per column, units. */
  function stats() {
    var rows, key, cols, unit = map.unit ? " (" + map.unit + ")" : "";
    if (view.crate === null) {
      key = "Crate"; cols = ["Mean" + unit, "Max" + unit];
      var fm = MC.columnFormat(map.crate.mean), fx = MC.columnFormat(map.crate.max);
      rows = map.crate.mean.map(function (v, c) { return ["crate " + c, fm(v), fx(map.crate.max[c])]; });
    } else if (view.card === null) {
      key = "Card"; cols = ["Mean" + unit, "Max" + unit];
      var means = map.card.mean[view.crate], maxes = map.card.max[view.crate];
      var gm = MC.columnFormat(means), gx = MC.columnFormat(maxes);
      rows = means.map(function (v, k) { return ["crate " + view.crate + " \u00b7 card " + k, gm(v), gx(maxes[k])]; });
    } else {
      key = "Channel"; cols = ["Value" + unit, "Baseline" + unit];
      var lo = view.crate * 512 + view.card * 32;
      var vals = map.values.slice(lo, lo + 32), base = map.baseline.slice(lo, lo + 32);
      var f = MC.columnFormat(vals.concat(base));
      rows = [];
      for (var i = 0; i < 32; i++) rows.push([MC.channelName(lo + i), f(vals[i]), f(base[i])]);
    }
    document.getElementById("stats-title").textContent = key === "Channel" ?
      "Channels of crate " + view.crate + " \u00b7 card " + view.card : key + "s";
    document.getElementById("stats-key").textContent = key;
    document.getElementById("stats-col1").textContent = cols[0];
    document.getElementById("stats-col2").textContent = cols[1];
    MC.fillRows(document.getElementById("stats-rows"), rows);
  }

  function lists() {
    [["hot", map.hot], ["dead", map.dead]].forEach(function (pair) {
      var ul = document.getElementById(pair[0] + "-list");
      document.getElementById(pair[0] + "-count").textContent = String(pair[1].length);
      var f = MC.columnFormat(pair[1].map(function (lcn) { return map.values[lcn]; }));
      var frag = document.createDocumentFragment();
      pair[1].slice(0, 50).forEach(function (lcn) {
        var li = m.el("li");
        var a = m.el("a", null, MC.channelName(lcn) + ": " + f(map.values[lcn]) + " " + map.unit);
        a.href = "#";
        a.dataset.lcn = lcn;
        a.addEventListener("click", function (e) { e.preventDefault(); openChannel(lcn); });
        li.appendChild(a);
        frag.appendChild(li);
      });
      if (pair[1].length > 50) frag.appendChild(m.el("li", "hint", "and " + (pair[1].length - 50) + " more (see CSV)"));
      ul.replaceChildren(frag);
    });
  }

  function load() {
    if (busy) return Promise.resolve();
    busy = true;
    saveUrl();
    var q = Object.assign(apiParams(), { encoding: "f32" });  // compact answer: a quarter of the server's work
    return m.getJSON("/api/detector?" + MC.query(q)).then(function (d) {
      d.values = MC.unpackF32(d.values_f32);
      d.baseline = MC.unpackF32(d.baseline_f32);
      map = d;
      document.getElementById("detector-error").hidden = true;
      draw();
    }).catch(function (err) {
      var box = document.getElementById("detector-error");
      box.hidden = false;
      box.textContent = "Could not load the map: " + err.message;
    }).then(function () { busy = false; });
  }

  // -- channel history ---------------------------------------------------------------

  function openChannel(lcn) {
    view.lcn = lcn; view.pushed = true;
    saveUrl();
    loadChannel();
  }

  function loadChannel() {
    var panel = document.getElementById("channel-panel");
    if (view.lcn === null) { panel.hidden = true; return Promise.resolve(); }
    panel.hidden = false;
    document.getElementById("channel-title").textContent = MC.channelName(view.lcn) + " (lcn " + view.lcn + ")";
    var q = MC.query(tw.apiParams());
    document.getElementById("channel-csv").href = "/api/channel/" + view.lcn + "?" + q + "&format=csv";
    document.getElementById("channel-json").href = "/api/channel/" + view.lcn + "?" + q + "&download=1";
    return m.getJSON("/api/channel/" + view.lcn + "?" + q).then(function (d) {
      var onZoom = function (a, b) { tw.setFixed(a, b); load(); loadChannel(); };
      var onZoomOut = function () { tw.zoomOut(); load(); loadChannel(); };
      [["occupancy", "#332288", "hits/event"], ["cmos", "#CC6677", "Hz"], ["base", "#117733", "ADC counts"]].forEach(function (c) {
        var chart = MC.timeChart(document.getElementById("chart-" + c[0]),
          { names: [c[0]], unit: c[2], colors: [c[1]], height: 160, onZoom: onZoom, onZoomOut: onZoomOut, sync: "channel" });
        chart.setData(d.t, [d[c[0]]]);
      });
      panel.dataset.lcn = String(view.lcn);
      document.body.dataset.channelLoaded = String(view.lcn);
      panel.scrollIntoView({ block: "nearest" });
    }).catch(function (err) {
      document.getElementById("channel-title").textContent = "Could not load channel " + view.lcn + ": " + err.message;
    });
  }

  /** The view (quantity, crate, card, channel) from the URL: at start and after Back/Forward. */
  function readView() {
    var p = MC.params();
    view.quantity = ["occupancy", "cmos", "base"].indexOf(p.quantity) >= 0 ? p.quantity : "occupancy";
    document.getElementById("quantity").value = view.quantity;
    view.crate = intParam(p, "crate", 18);
    view.card = view.crate === null ? null : intParam(p, "card", 15);
    view.lcn = intParam(p, "lcn", 9727);
  }

  document.addEventListener("DOMContentLoaded", function () {
    tw = new MC.TimeWindow("10m");
    var q = document.getElementById("quantity");
    readView();
    q.addEventListener("change", function () { view.quantity = q.value; view.pushed = true; load(); });
    document.getElementById("channel-close").addEventListener("click", function () {
      view.lcn = null; saveUrl(); loadChannel();
    });
    MC.toolbar(tw, function (how) {
      if (how && how.history) readView();
      load(); loadChannel();
    });
    var width = 0;
    window.addEventListener("resize", function () {
      var w = document.getElementById("map").clientWidth;
      if (Math.abs(w - width) > 8) { width = w; draw(); }
    });
    document.addEventListener("minard:tz", function () { draw(); loadChannel(); });
    load();
    loadChannel();
    setInterval(function () { if (tw.live) load(); }, REFRESH_MS);
  });
})();
