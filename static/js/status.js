/* Status page: refresh the one-row-per-program table every 5 s (textContent only). */
(function () {
  "use strict";
  var m = window.minard;

  function safeLink(link) {
    return typeof link === "string" && /^\/(?!\/)/.test(link);
  }

  function cell(tr, cls, text) { var td = m.el("td", cls, text); tr.appendChild(td); return td; }

  function stageBox(s) {
    var div = m.el("div", "stage" + (s.over ? " over" : ""));
    div.dataset.stage = s.stage;
    div.appendChild(m.el("span", "stage-name", s.stage));
    div.appendChild(document.createTextNode(" "));
    var lost = m.el("span", "lost" + (s.lost ? " bad" : ""), s.lost + " lost");
    lost.title = "dropped + errors";
    div.appendChild(lost);
    div.appendChild(document.createTextNode(" "));
    div.appendChild(m.el("span", "hint", s.received + " in \u00b7 " + s.processed + " out" +
      (s.dropped ? " \u00b7 " + s.dropped + " dropped" : "") + (s.errors ? " \u00b7 " + s.errors + " errors" : "")));
    if (s.over) {
      div.appendChild(document.createTextNode(" "));
      div.appendChild(m.el("span", "badge flag", "processed > received"));
    }
    Object.keys(s.other || {}).forEach(function (k) {
      div.appendChild(m.el("span", "hint", " \u00b7 " + k + " " + s.other[k]));
    });
    return div;
  }

  function row(p) {
    var tr = m.el("tr", "state-" + p.state + (p.flag ? " flagged" : ""));
    tr.dataset.name = p.name;
    var name = cell(tr, "name");
    name.appendChild(m.el("strong", null, p.name));
    if (p.description) name.appendChild(m.el("div", "hint", p.description));
    var st = cell(tr);
    st.appendChild(m.el("span", "badge state-" + p.state, p.state));
    if (p.reported) { st.appendChild(document.createTextNode(" ")); st.appendChild(m.el("span", "reported", p.state === "up" ? p.reported : "(last: " + p.reported + ")")); }
    if (p.supervisor) st.appendChild(m.el("div", "hint", "supervisord: " + p.supervisor));
    cell(tr, null, m.duration(p.uptime));
    cell(tr, null, p.age === null ? "never" : m.duration(p.age) + " ago");
    var host = cell(tr, null, p.host || "-");
    if (p.pid) host.appendChild(m.el("div", "hint", "pid " + p.pid));
    cell(tr, "num", p.lag === null ? "-" : p.lag);
    var losses = cell(tr, "losses");
    if (p.stages.length) p.stages.forEach(function (s) { losses.appendChild(stageBox(s)); });
    else losses.textContent = "-";
    var log = cell(tr);
    if (p.log && safeLink(p.log)) { var a = m.el("a", null, "log"); a.href = p.log; log.appendChild(a); } else log.textContent = "-";
    var det = cell(tr, "details");
    var keys = Object.keys(p.details || {});
    if (!keys.length) det.textContent = "-";
    else {
      var dl = m.el("dl", "fields");
      keys.forEach(function (k) {
        var d = m.el("div");
        d.appendChild(m.el("dt", null, k));
        d.appendChild(m.el("dd", null, p.details[k]));
        dl.appendChild(d);
      });
      // Folded: a pool reports 15+ fields, which would make every row a screen tall.
      var box = m.el("details");
      box.appendChild(m.el("summary", null, keys.length + " fields"));
      box.appendChild(dl);
      det.appendChild(box);
    }
    return tr;
  }

  function poolRow(p) {
    var tr = m.el("tr", "state-" + p.state);
    tr.dataset.pool = p.pool;
    tr.appendChild(m.el("td", null, p.pool));
    tr.appendChild(m.el("td", null, p.component));
    var st = m.el("td");
    st.appendChild(m.el("span", "badge state-" + p.state, p.state));
    tr.appendChild(st);
    tr.appendChild(m.el("td", null, p.age === null ? "never" : m.duration(p.age) + " ago"));
    ["workers", "received", "processed", "lost"].forEach(function (k) {
      var td = m.el("td", "num", String(p[k]));
      if (k === "processed" && p.over) {
        td.appendChild(document.createTextNode(" "));
        td.appendChild(m.el("span", "badge flag", "processed > received"));
      }
      tr.appendChild(td);
    });
    return tr;
  }

  function refresh() {
    m.getJSON("/api/status").then(function (data) {
      var tbody = document.getElementById("status-rows");
      if (!tbody || !data.rows || !data.rows.length) return;
      var frag = document.createDocumentFragment();
      data.rows.forEach(function (p) { frag.appendChild(row(p)); });
      tbody.replaceChildren(frag);
      var pools = document.getElementById("pool-rows");
      if (pools && data.pools && data.pools.length) {
        var pf = document.createDocumentFragment();
        data.pools.forEach(function (p) { pf.appendChild(poolRow(p)); });
        pools.replaceChildren(pf);
      }
      document.body.dataset.statusRefreshed = String(Number(document.body.dataset.statusRefreshed || 0) + 1);
    }).catch(function () {});
  }

  document.addEventListener("DOMContentLoaded", function () { setInterval(refresh, 5000); });
})();
