/* minard: shared helpers and the alarm bell, loaded on every page.
 *
 * Every page polls /api/alarms/summary; while an alarm of level >= 40 is
 * active (not acknowledged, not shelved) the bell rings with a WebAudio beep
 * unless this browser muted it (localStorage "minard.alarms.muted").
 * Browsers only allow sound after a user gesture, so the first click or key
 * press enables it.  Data is always inserted with textContent, never as HTML.
 */
(function () {
  "use strict";

  var MUTE_KEY = "minard.alarms.muted";
  var POLL_MS = 3000;
  var RING_MS = 1500;

  /** Create an element with optional class and text (set as text, never HTML). */
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** Local date-time of an epoch time in seconds. */
  function when(ts) {
    if (!ts) return "-";
    var d = new Date(ts * 1000);
    function p(n) { return (n < 10 ? "0" : "") + n; }
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
      p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  /** Seconds as "3 d 04:05:06" or "04:05:06". */
  function duration(s) {
    if (s === null || s === undefined) return "-";
    s = Math.max(0, Math.floor(s));
    var d = Math.floor(s / 86400); s -= d * 86400;
    var h = Math.floor(s / 3600); s -= h * 3600;
    var m = Math.floor(s / 60); s -= m * 60;
    function p(n) { return (n < 10 ? "0" : "") + n; }
    return (d ? d + " d " : "") + p(h) + ":" + p(m) + ":" + p(s);
  }

  /** GET a JSON document of this site; rejects on HTTP errors. */
  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error(url + ": HTTP " + r.status);
        return r.json();
      });
  }

  function csrf() {
    var m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.getAttribute("content") : "";
  }

  // -- the bell ---------------------------------------------------------------
  var bell = { ringing: 0, active: 0, muted: false, rings: 0, beeps: 0, gesture: false, polls: 0 };
  var audioCtx = null;

  function readMuted() {
    try { return window.localStorage.getItem(MUTE_KEY) === "1"; } catch (e) { return false; }
  }

  function setMuted(muted) {
    bell.muted = muted;
    try { window.localStorage.setItem(MUTE_KEY, muted ? "1" : "0"); } catch (e) { /* private mode */ }
    render();
  }

  /** The audio context, created only after a user gesture (autoplay policy). */
  function audio() {
    if (!bell.gesture) return null;
    if (!audioCtx) {
      var AC = window.AudioContext || window.webkitAudioContext;
      if (!AC) return null;
      audioCtx = new AC();
    }
    if (audioCtx.state === "suspended") audioCtx.resume().catch(function () {});
    return audioCtx;
  }

  /** One short two-tone beep. */
  function beep() {
    var ctx = audio();
    if (!ctx || ctx.state !== "running") return false;
    [0, 0.22].forEach(function (offset, i) {
      var t = ctx.currentTime + offset;
      var osc = ctx.createOscillator();
      var gain = ctx.createGain();
      osc.type = "square";
      osc.frequency.value = i ? 660 : 880;
      gain.gain.setValueAtTime(0.0001, t);
      gain.gain.exponentialRampToValueAtTime(0.15, t + 0.01);
      gain.gain.exponentialRampToValueAtTime(0.0001, t + 0.18);
      osc.connect(gain);
      gain.connect(ctx.destination);
      osc.start(t);
      osc.stop(t + 0.2);
    });
    bell.beeps += 1;
    return true;
  }

  function ring() {
    if (bell.ringing > 0 && !bell.muted) {
      bell.rings += 1;
      beep();
    }
  }

  /** Show the indicator, the mute button and the sound hint. */
  function render() {
    var ind = document.getElementById("alarm-indicator");
    if (ind) {
      ind.textContent = bell.ringing > 0 ? bell.ringing + " ringing" :
        (bell.active > 0 ? bell.active + " active" : "no active alarms");
      ind.classList.toggle("ringing", bell.ringing > 0);
      ind.classList.toggle("has-active", bell.active > 0 && bell.ringing === 0);
    }
    var btn = document.getElementById("mute-toggle");
    if (btn) {
      btn.textContent = bell.muted ? "Muted" : "Sound on";
      btn.setAttribute("aria-pressed", bell.muted ? "true" : "false");
    }
    var hint = document.getElementById("sound-hint");
    if (hint) hint.hidden = !(bell.ringing > 0 && !bell.muted && !bell.gesture);
  }

  function poll() {
    getJSON("/api/alarms/summary").then(function (s) {
      bell.ringing = s.ringing;
      bell.active = s.active;
      bell.polls += 1;
      render();
      document.dispatchEvent(new CustomEvent("minard:alarms", { detail: s }));
    }).catch(function () { /* server away: try again at the next poll */ });
  }

  function onGesture() {
    bell.gesture = true;
    audio();
    render();
  }

  document.addEventListener("DOMContentLoaded", function () {
    bell.muted = readMuted();
    var btn = document.getElementById("mute-toggle");
    if (btn) btn.addEventListener("click", function () { setMuted(!bell.muted); });
    document.addEventListener("click", onGesture, { once: true, capture: true });
    document.addEventListener("keydown", onGesture, { once: true, capture: true });
    render();
    poll();
    setInterval(poll, POLL_MS);
    setInterval(ring, RING_MS);
  });

  window.addEventListener("storage", function (e) {
    if (e.key === MUTE_KEY) { bell.muted = e.newValue === "1"; render(); }
  });

  window.minard = { el: el, when: when, duration: duration, getJSON: getJSON, csrf: csrf, bell: bell, poll: poll };
})();
