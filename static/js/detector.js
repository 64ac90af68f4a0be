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
  var tw, view = { quantity: "occupancy", crate: null, card: null, lcn: null }, map = null, busy = false;

  function intParam(p, k, max) {
    var v = p[k];
    if (v === undefined || !/^\d+$/.test(v) || +v > max) return null;
    return +v;
  }

  function apiParams() { return Object.assign({ quantity: view.quantity }, tw.apiParams()); }

  function saveUrl() {
    var p = Object.assign({ quantity: view.quantity }, tw.urlParams(),
      { crate: view.crate, card: view.card, lcn: view.lcn });
    MC.setParams(p);
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
    view.crate = crate; view.card = card;
    saveUrl(); draw();
  }

  function draw() {
    crumbs();
    if (!map) return;
    MC.channelMap(document.getElementById("map"), {
      values: map.values, baseline: map.baseline, hot: map.hot, dead: map.dead, flags: map.flags, unit: map.unit,
      crate: view.crate, card: view.card,
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

  function stats() {
    var rows, key;
    if (view.crate === null) {
      key = "Crate";
      rows = map.crate.mean.map(function (v, c) { return ["crate " + c, MC.fmt(v, 4), MC.fmt(map.crate.max[c], 4)]; });
    } else if (view.card === null) {
      key = "Card";
      rows = map.card.mean[view.crate].map(function (v, k) { return ["card " + k, MC.fmt(v, 4), MC.fmt(map.card.max[view.crate][k], 4)]; });
    } else {
      key = "Channel";
      var lo = view.crate * 512 + view.card * 32;
      rows = [];
      for (var i = 0; i < 32; i++) rows.push(["ch " + i, MC.fmt(map.values[lo + i], 4), "base " + MC.fmt(map.baseline[lo + i], 4)]);
    }
    document.getElementById("stats-title").textContent = key === "Channel" ? "Channels (value, baseline)" : key + "s (mean, max)";
    document.getElementById("stats-key").textContent = key;
    MC.fillRows(document.getElementById("stats-rows"), rows);
  }

  function lists() {
    [["hot", map.hot], ["dead", map.dead]].forEach(function (pair) {
      var ul = document.getElementById(pair[0] + "-list");
      document.getElementById(pair[0] + "-count").textContent = String(pair[1].length);
      var frag = document.createDocumentFragment();
      pair[1].slice(0, 50).forEach(function (lcn) {
        var p = MC.parts(lcn);
        var li = m.el("li");
        var a = m.el("a", null, p.crate + "/" + p.card + "/" + p.channel + " (" + lcn + "): " + MC.fmt(map.values[lcn], 4));
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
    return m.getJSON("/api/detector?" + MC.query(apiParams())).then(function (d) {
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
    view.lcn = lcn;
    saveUrl();
    loadChannel();
  }

  function loadChannel() {
    var panel = document.getElementById("channel-panel");
    if (view.lcn === null) { panel.hidden = true; return Promise.resolve(); }
    var p = MC.parts(view.lcn);
    panel.hidden = false;
    document.getElementById("channel-title").textContent =
      "Channel " + p.crate + "/" + p.card + "/" + p.channel + " (lcn " + view.lcn + ")";
    var q = MC.query(tw.apiParams());
    document.getElementById("channel-csv").href = "/api/channel/" + view.lcn + "?" + q + "&format=csv";
    document.getElementById("channel-json").href = "/api/channel/" + view.lcn + "?" + q + "&download=1";
    return m.getJSON("/api/channel/" + view.lcn + "?" + q).then(function (d) {
      var onZoom = function (a, b) { tw.setFixed(a, b); load(); loadChannel(); };
      [["occupancy", "#1f77b4"], ["cmos", "#d62728"], ["base", "#2ca02c"]].forEach(function (c) {
        var chart = MC.timeChart(document.getElementById("chart-" + c[0]),
          { names: [c[0]], unit: "", colors: [c[1]], height: 160, onZoom: onZoom, sync: "channel" });
        chart.setData(d.t, [d[c[0]]]);
      });
      panel.dataset.lcn = String(view.lcn);
      document.body.dataset.channelLoaded = String(view.lcn);
      panel.scrollIntoView({ block: "nearest" });
    }).catch(function (err) {
      document.getElementById("channel-title").textContent = "Could not load channel " + view.lcn + ": " + err.message;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var p = MC.params();
    tw = new MC.TimeWindow("10m");
    var q = document.getElementById("quantity");
    if (["occupancy", "cmos", "base"].indexOf(p.quantity) >= 0) view.quantity = p.quantity;
    q.value = view.quantity;
    view.crate = intParam(p, "crate", 18);
    view.card = view.crate === null ? null : intParam(p, "card", 15);
    view.lcn = intParam(p, "lcn", 9727);
    q.addEventListener("change", function () { view.quantity = q.value; load(); });
    document.getElementById("channel-close").addEventListener("click", function () {
      view.lcn = null; saveUrl(); loadChannel();
    });
    MC.toolbar(tw, function () { load(); loadChannel(); });
    load();
    loadChannel();
    setInterval(function () { if (tw.live) load(); }, REFRESH_MS);
  });
})();
