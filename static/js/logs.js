/* Log page: append new lines of the program's log (polled every 2 s).
 * The server follows rotation; text is appended as a text node, never as HTML.
 */
(function () {
  "use strict";
  var m = window.minard;
  var MAX_CHARS = 512 * 1024;

  function poll(pre) {
    var url = "/api/logs/tail?name=" + encodeURIComponent(pre.dataset.name) +
      "&ino=" + encodeURIComponent(pre.dataset.ino || "0") + "&pos=" + encodeURIComponent(pre.dataset.pos || "0");
    return m.getJSON(url).then(function (data) {
      pre.dataset.ino = String(data.ino);
      pre.dataset.pos = String(data.pos);
      var state = document.getElementById("log-state");
      if (state) state.textContent = data.missing ? "no log file yet" : (data.rotated ? "log rotated" : "");
      if (data.text) {
        pre.appendChild(document.createTextNode(data.text));
        if (pre.textContent.length > MAX_CHARS) {
          pre.textContent = pre.textContent.slice(-MAX_CHARS / 2);
        }
        var follow = document.getElementById("log-follow");
        if (!follow || follow.checked) pre.scrollTop = pre.scrollHeight;
      }
    }).catch(function () {});
  }

  document.addEventListener("DOMContentLoaded", function () {
    var pre = document.getElementById("log-text");
    if (!pre) return;
    pre.scrollTop = pre.scrollHeight;
    setInterval(function () { poll(pre); }, 2000);
  });
})();
