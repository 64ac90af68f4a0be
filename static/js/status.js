/* Status page: refresh the program table every 5 s (textContent only). */
(function () {
  "use strict";
  var m = window.minard;

  function safeLink(link) {
    return typeof link === "string" && (/^\/(?!\/)/.test(link) || /^https?:\/\//.test(link));
  }

  function row(p) {
    var tr = m.el("tr", "state-" + p.state);
    tr.dataset.name = p.name;
    var name = m.el("td");
    if (p.link && safeLink(p.link)) {
      var a = m.el("a", null, p.name);
      a.href = p.link;
      name.appendChild(a);
    } else {
      name.textContent = p.name;
    }
    tr.appendChild(name);
    var st = m.el("td");
    st.appendChild(m.el("span", "badge state-" + p.state, p.state));
    tr.appendChild(st);
    tr.appendChild(m.el("td", null, m.duration(p.uptime)));
    tr.appendChild(m.el("td", null, p.age === null ? "never" : m.duration(p.age) + " ago"));
    var host = p.host + (p.reported_host && p.reported_host !== p.host ? " (" + p.reported_host + ")" : "");
    tr.appendChild(m.el("td", null, host));
    tr.appendChild(m.el("td", null, p.status));
    tr.appendChild(m.el("td", null, p.supervisor || "-"));
    tr.appendChild(metricCell(p.metrics));
    tr.appendChild(m.el("td", null, p.description));
    return tr;
  }

  function metricCell(obj) {
    var td = m.el("td", "metrics");
    Object.keys(obj || {}).forEach(function (k) {
      td.appendChild(m.el("span", "metric", k + "=" + obj[k]));
      td.appendChild(document.createTextNode(" "));
    });
    return td;
  }

  function pipelineRow(p) {
    var tr = m.el("tr", "state-" + p.state);
    tr.dataset.name = p.name;
    tr.appendChild(m.el("td", null, p.name));
    var st = m.el("td");
    st.appendChild(m.el("span", "badge state-" + p.state, p.state));
    st.appendChild(document.createTextNode(" " + (p.reported || "")));
    tr.appendChild(st);
    tr.appendChild(m.el("td", null, m.duration(p.uptime)));
    tr.appendChild(m.el("td", null, p.age === null ? "never" : m.duration(p.age) + " ago"));
    tr.appendChild(m.el("td", null, p.host));
    tr.appendChild(m.el("td", "num", p.pid));
    tr.appendChild(m.el("td", "num", p.lag === null || p.lag === undefined ? "-" : p.lag));
    tr.appendChild(metricCell(p.other));
    return tr;
  }

  function stageRow(s) {
    var tr = m.el("tr", s.lost ? "state-down" : "");
    tr.dataset.stage = s.stage;
    tr.appendChild(m.el("td", null, s.stage));
    tr.appendChild(m.el("td", "num", s.lost));
    tr.appendChild(metricCell(s.counters));
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
      tr.appendChild(m.el("td", "num", String(p[k])));
    });
    return tr;
  }

  /** Replace a table body's rows, unless there is nothing to show (keep the hint). */
  function fill(id, items, make) {
    var tbody = document.getElementById(id);
    if (!tbody || !items || !items.length) return;
    var rows = document.createDocumentFragment();
    items.forEach(function (x) { rows.appendChild(make(x)); });
    tbody.replaceChildren(rows);
  }

  function refresh() {
    m.getJSON("/api/status").then(function (data) {
      fill("status-rows", data.programs, row);
      fill("pipeline-rows", data.pipeline, pipelineRow);
      fill("stage-rows", data.stages, stageRow);
      fill("pool-rows", data.pools, poolRow);
    }).catch(function () {});
  }

  document.addEventListener("DOMContentLoaded", function () { setInterval(refresh, 5000); });
})();
