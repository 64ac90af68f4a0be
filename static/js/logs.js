/* Log page: the program's log, coloured and filterable by level, new lines
 * appended as they come (polled every 2 s; the server follows rotation).
 *
 * Each line becomes a <span class="line lvl-LEVEL"> (text only, never HTML);
 * the level is the first level word of the line (logging's ERROR/CRITICAL and
 * the log server's DANGER count as "error"), continuation lines keep the
 * level of the entry they belong to.  Unticking a level hides its lines.
 */
(function () {
  "use strict";
  var m = window.minard;
  var MAX_LINES = 5000;
  var LEVEL = /\b(DEBUG|INFO|SUCCESS|WARNING|WARN|ERROR|DANGER|CRITICAL|FATAL)\b/;
  var CLASS = { DEBUG: "debug", INFO: "info", SUCCESS: "info", WARNING: "warning", WARN: "warning",
    ERROR: "error", DANGER: "error", CRITICAL: "error", FATAL: "error" };
  var st = { level: "info", pending: "", counts: { debug: 0, info: 0, warning: 0, error: 0 } };

  /** The level class of one line (continuations inherit the previous one). */
  function levelOf(line) {
    if (/^\s/.test(line) && line.trim()) return st.level;
    var mt = LEVEL.exec(line.slice(0, 120));
    if (mt) st.level = CLASS[mt[1]];
    return mt ? st.level : "info";
  }

  /** Append *text* as coloured lines; an unfinished last line waits for the rest. */
  function append(pre, text) {
    var lines = (st.pending + text).split("\n");
    st.pending = lines.pop();
    var frag = document.createDocumentFragment();
    lines.forEach(function (line) {
      var lvl = levelOf(line);
      st.counts[lvl] += 1;
      frag.appendChild(m.el("span", "line lvl-" + lvl, line + "\n"));
    });
    pre.appendChild(frag);
    while (pre.childNodes.length > MAX_LINES) pre.removeChild(pre.firstChild);
    counts();
  }

  function counts() {
    Object.keys(st.counts).forEach(function (k) {
      var n = document.getElementById("count-" + k);
      if (n) n.textContent = String(st.counts[k]);
    });
  }

  function poll(pre) {
    var url = "/api/logs/tail?name=" + encodeURIComponent(pre.dataset.name) +
      "&ino=" + encodeURIComponent(pre.dataset.ino || "0") + "&pos=" + encodeURIComponent(pre.dataset.pos || "0");
    return m.getJSON(url).then(function (data) {
      pre.dataset.ino = String(data.ino);
      pre.dataset.pos = String(data.pos);
      var state = document.getElementById("log-state");
      if (state) state.textContent = data.missing ? "no log file yet" : (data.rotated ? "log rotated" : "");
      if (data.text) {
        append(pre, data.text);
        var follow = document.getElementById("log-follow");
        if (!follow || follow.checked) pre.scrollTop = pre.scrollHeight;
      }
    }).catch(function () {});
  }

  document.addEventListener("DOMContentLoaded", function () {
    var pre = document.getElementById("log-text");
    if (!pre) return;
    var initial = pre.textContent;
    pre.replaceChildren();
    append(pre, initial.endsWith("\n") || !initial ? initial : initial + "\n");
    document.querySelectorAll("#log-levels input[data-level]").forEach(function (box) {
      var apply = function () { pre.classList.toggle("hide-" + box.dataset.level, !box.checked); };
      box.addEventListener("change", apply);
      apply();
    });
    pre.scrollTop = pre.scrollHeight;
    pre.dataset.rendered = "1";
    setInterval(function () { poll(pre); }, 2000);
  });
})();
