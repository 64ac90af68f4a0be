/* Alarms page: keep the alarm list current without reloading the page.
 * Rows are built with DOM calls and textContent only.  While the operator is
 * filling a form in the table, the list is not redrawn.
 */
(function () {
  "use strict";
  var m = window.minard;
  var signature = null;

  function stateText(a) {
    if (a.state === "acknowledged") {
      return "acknowledged by " + a.ack_by + " at " + m.when(a.ack_at) + (a.ack_comment ? ": " + a.ack_comment : "");
    }
    if (a.state === "shelved") {
      return "shelved by " + a.shelved_by + " until " + m.when(a.shelved_until) + (a.shelve_comment ? ": " + a.shelve_comment : "");
    }
    if (a.state === "suppressed") return "suppressed by " + a.suppressed;
    return a.state.replace(/_/g, " ") + (a.shelve_expired ? " (shelve expired)" : "");
  }

  function hidden(name, value) {
    var i = document.createElement("input");
    i.type = "hidden"; i.name = name; i.value = value;
    return i;
  }

  function form(action, cls) {
    var f = document.createElement("form");
    f.method = "post"; f.action = action; f.className = cls;
    f.appendChild(hidden("csrf_token", m.csrf()));
    return f;
  }

  function textInput(name, placeholder) {
    var i = document.createElement("input");
    i.name = name; i.placeholder = placeholder; i.maxLength = 500;
    i.setAttribute("aria-label", placeholder);
    return i;
  }

  function button(label) {
    var b = m.el("button", "btn btn-small", label);
    b.type = "submit";
    return b;
  }

  function actions(a, minutes) {
    var td = m.el("td", "actions");
    if (a.ack_at !== null || a.state === "normal" || a.state === "out_of_service") {
      if (a.state === "latched") {
        var rs = form("/alarms/" + a.id + "/reset", "reset-form");
        rs.appendChild(button("Reset"));
        td.appendChild(rs);
      }
      return td;
    }
    var ack = form("/alarms/" + a.id + "/ack", "ack-form");
    ack.appendChild(textInput("comment", "comment"));
    ack.appendChild(button("Acknowledge"));
    td.appendChild(ack);
    if (a.state === "shelved") {
      var un = form("/alarms/" + a.id + "/unshelve", "unshelve-form");
      un.appendChild(button("Unshelve"));
      td.appendChild(un);
      return td;
    }
    var sh = form("/alarms/" + a.id + "/shelve", "shelve-form");
    var sel = document.createElement("select");
    sel.name = "minutes"; sel.required = true; sel.setAttribute("aria-label", "shelve for");
    var first = m.el("option", null, "shelve for\u2026"); first.value = "";
    sel.appendChild(first);
    minutes.forEach(function (n) {
      var o = m.el("option", null, n >= 60 ? Math.floor(n / 60) + " h" : n + " min");
      o.value = String(n);
      sel.appendChild(o);
    });
    sh.appendChild(sel);
    sh.appendChild(textInput("comment", "reason"));
    sh.appendChild(button("Shelve"));
    td.appendChild(sh);
    return td;
  }

  function row(a, loggedIn, minutes) {
    var tr = m.el("tr", "alarm level-" + a.level_name + " state-" + a.state);
    tr.dataset.id = String(a.id);
    var lvl = m.el("td");
    lvl.appendChild(m.el("span", "badge level-" + a.level_name + " priority-" + a.priority, a.priority));
    tr.appendChild(lvl);
    var last = m.el("td", null, m.when(a.last));
    last.title = "first " + m.when(a.first) + " " + m.tzLabel();
    tr.appendChild(last);
    tr.appendChild(m.el("td", "num", a.count));
    tr.appendChild(m.el("td", null, a.program));
    tr.appendChild(m.el("td", null, a.source));
    var msg = m.el("td", "message");
    var link = m.el("a", null, a.message);
    link.href = "/alarms/" + a.id;
    msg.appendChild(link);
    tr.appendChild(msg);
    tr.appendChild(m.el("td", null, stateText(a)));
    tr.appendChild(loggedIn ? actions(a, minutes) : m.el("td", "actions"));
    return tr;
  }

  /** True while the operator is using a form in the table. */
  function busy(tbody) {
    var active = document.activeElement;
    if (active && tbody.contains(active) && active.tagName !== "BUTTON") return true;
    return Array.prototype.some.call(tbody.querySelectorAll("input[name=comment], select"), function (i) {
      return i.value !== "";
    });
  }

  function refresh() {
    var tbody = document.getElementById("alarm-rows");
    if (!tbody) return;
    var state = new URLSearchParams(window.location.search).get("state");
    m.getJSON("/api/alarms" + (state ? "?state=" + encodeURIComponent(state) : "")).then(function (data) {
      var sig = JSON.stringify([data.logged_in, data.alarms.map(function (a) {
        return [a.id, a.count, a.state, a.last, a.message];
      })]);
      if (sig === signature || busy(tbody)) return;
      var rows = document.createDocumentFragment();
      data.alarms.forEach(function (a) { rows.appendChild(row(a, data.logged_in, data.shelve_minutes)); });
      if (!data.alarms.length) {
        var empty = m.el("tr", "empty");
        var td = m.el("td", null, "No alarms in the history.");
        td.colSpan = 8;
        empty.appendChild(td);
        rows.appendChild(empty);
      }
      tbody.replaceChildren(rows);
      signature = sig;
      document.body.dataset.alarmsRendered = String((Number(document.body.dataset.alarmsRendered) || 0) + 1);
    }).catch(function () { /* keep the last list; the indicator shows the server state */ });
  }

  /** "Active only": hide acknowledged and shelved alarms (remembered in the URL, ?active=1). */
  function activeFilter() {
    var box = document.getElementById("active-only"), table = document.getElementById("alarm-table");
    if (!box || !table) return;
    box.checked = new URLSearchParams(window.location.search).get("active") === "1";
    var apply = function () {
      table.classList.toggle("active-only", box.checked);
      var q = new URLSearchParams(window.location.search);
      if (box.checked) q.set("active", "1"); else q.delete("active");
      var s = q.toString();
      window.history.replaceState(null, "", window.location.pathname + (s ? "?" + s : ""));
    };
    box.addEventListener("change", apply);
    apply();
  }

  document.addEventListener("DOMContentLoaded", function () {
    activeFilter();
    refresh();
    setInterval(refresh, 3000);
  });
})();
