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

  // -- time zone: UTC by default, local per browser (localStorage "minard.tz") ----------
  var TZ_KEY = "minard.tz";

  function p2(n) { return (n < 10 ? "0" : "") + n; }

  /** True when this browser shows local time instead of UTC. */
  function isLocal() {
    try { return window.localStorage.getItem(TZ_KEY) === "local"; } catch (e) { return false; }
  }

  /** The label of the time zone shown: "UTC" or "local (UTC+01:00)". */
  function tzLabel() {
    if (!isLocal()) return "UTC";
    var off = -new Date().getTimezoneOffset();
    var sign = off < 0 ? "-" : "+";
    off = Math.abs(off);
    return "local (UTC" + sign + p2(Math.floor(off / 60)) + ":" + p2(off % 60) + ")";
  }

  /** Calendar fields of an epoch time (seconds) in the zone shown. */
  function fields(ts) {
    var d = new Date(ts * 1000);
    if (isLocal()) {
      return { y: d.getFullYear(), mo: d.getMonth() + 1, d: d.getDate(), h: d.getHours(), mi: d.getMinutes(), s: d.getSeconds() };
    }
    return { y: d.getUTCFullYear(), mo: d.getUTCMonth() + 1, d: d.getUTCDate(), h: d.getUTCHours(), mi: d.getUTCMinutes(), s: d.getUTCSeconds() };
  }

  /** "YYYY-MM-DD HH:MM:SS" (24-hour, seconds) of an epoch time in the zone shown; "-" for none. */
  function when(ts) {
    if (!ts && ts !== 0) return "-";
    var f = fields(ts);
    return f.y + "-" + p2(f.mo) + "-" + p2(f.d) + " " + p2(f.h) + ":" + p2(f.mi) + ":" + p2(f.s);
  }

  /** "HH:MM:SS" of an epoch time in the zone shown. */
  function clock(ts) {
    var f = fields(ts);
    return p2(f.h) + ":" + p2(f.mi) + ":" + p2(f.s);
  }

  /**
   * Epoch seconds of a typed date-time "YYYY-MM-DD[ T]HH:MM[:SS]" read in the
   * zone shown (an explicit "Z" or "+01:00" wins); NaN if it is not one.
   */
  function parseWhen(text) {
    var mt = /^(\d{4})-(\d\d)-(\d\d)(?:[ T](\d\d):(\d\d)(?::(\d\d(?:\.\d+)?))?)?\s*(Z|[+-]\d\d:?\d\d)?$/.exec(String(text).trim());
    if (!mt) return NaN;
    var parts = [+mt[1], +mt[2] - 1, +mt[3], +(mt[4] || 0), +(mt[5] || 0), +(mt[6] || 0)];
    var t;
    if (mt[7]) {
      t = Date.UTC.apply(null, parts) / 1000;
      if (mt[7] !== "Z") {
        var o = /([+-])(\d\d):?(\d\d)/.exec(mt[7]);
        t -= (o[1] === "-" ? -1 : 1) * (+o[2] * 3600 + +o[3] * 60);
      }
    } else if (isLocal()) {
      t = new Date(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5]).getTime() / 1000;
    } else {
      t = Date.UTC.apply(null, parts) / 1000;
    }
    return isFinite(t) ? t : NaN;
  }

  /** Rewrite every server-rendered <time data-t> and every .tz-label for the zone shown. */
  function renderTimes(root) {
    (root || document).querySelectorAll("time[data-t]").forEach(function (node) {
      var t = parseFloat(node.dataset.t);
      if (isFinite(t)) node.textContent = when(t);
    });
    (root || document).querySelectorAll(".tz-label").forEach(function (node) { node.textContent = tzLabel(); });
    var btn = document.getElementById("tz-toggle");
    if (btn) {
      btn.textContent = isLocal() ? "Local time" : "UTC";
      btn.title = "Times are shown in " + tzLabel() + "; click for " + (isLocal() ? "UTC" : "this browser's local time");
      btn.setAttribute("aria-pressed", isLocal() ? "true" : "false");
    }
  }

  /** Switch this browser between UTC and local time; pages redraw on "minard:tz". */
  function setLocal(local) {
    try { window.localStorage.setItem(TZ_KEY, local ? "local" : "utc"); } catch (e) { /* private mode */ }
    renderTimes();
    document.dispatchEvent(new CustomEvent("minard:tz", { detail: { local: local } }));
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

  // -- the status banner (every page) ---------------------------------------------
  var BANNER_MS = 2000;

  function setBanner(id, text, cls) {
    var node = document.getElementById(id);
    if (!node) return null;
    var value = node.querySelector(".b-value");
    (value || node).textContent = String(text);
    if (cls !== undefined) node.dataset.level = cls;
    return node;
  }

  /** Fill the banner from /api/banner (text only). */
  function renderBanner(b) {
    var runNode = setBanner("b-run", b.run === null ? "none" : b.run + (b.subrun !== null ? " \u00b7 subrun " + b.subrun : ""));
    if (runNode && b.run !== null) runNode.href = "/runs/" + encodeURIComponent(b.run);
    setBanner("b-elapsed", b.elapsed === null ? "-" : duration(b.elapsed));
    setBanner("b-state", b.state, b.state === "running" ? "ok" : b.state === "stalled" ? "amber" : "red");
    var rate = setBanner("b-rate", b.rate === null ? "-" : formatRate(b.rate) + " Hz");
    if (rate) rate.title = "TOTAL, mean over " + b.rate_seconds + " complete seconds " + clock(b.rate_start) +
      "\u2013" + clock(b.rate_stop) + " " + tzLabel();
    var age = setBanner("b-age", b.data_age === null ? "no data" : duration(b.data_age) + " ago", b.data_class);
    if (age) age.title = "Time since the last data reached the monitoring (amber after " + b.amber_seconds +
      " s, red after " + b.red_seconds + " s)";
    var a = b.alarms || {};
    setBanner("b-alarms", a.active ? a.active + " active, worst " + a.worst : "none active",
      !a.active ? "ok" : (a.worst_level >= 40 ? "red" : "amber"));
    var box = document.getElementById("status-banner");
    if (box) box.dataset.loaded = String(Number(box.dataset.loaded || 0) + 1);
  }

  /** A rate with 4 significant figures and no exponent below 1e6. */
  function formatRate(v) {
    if (v >= 1000) return Math.round(v).toString();
    return (+v.toPrecision(4)).toString();
  }

  function pollBanner() {
    if (!document.getElementById("status-banner")) return;
    getJSON("/api/banner").then(renderBanner).catch(function () {
      setBanner("b-state", "site not answering", "red");
    });
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
    var tz = document.getElementById("tz-toggle");
    if (tz) tz.addEventListener("click", function () { setLocal(!isLocal()); });
    renderTimes();
    render();
    poll();
    setInterval(poll, POLL_MS);
    pollBanner();
    setInterval(pollBanner, BANNER_MS);
    setInterval(ring, RING_MS);
  });

  window.addEventListener("storage", function (e) {
    if (e.key === MUTE_KEY) { bell.muted = e.newValue === "1"; render(); }
    if (e.key === TZ_KEY) { setLocal(e.newValue === "local"); }
  });

  window.minard = { el: el, when: when, clock: clock, duration: duration, getJSON: getJSON, csrf: csrf, bell: bell,
    poll: poll, isLocal: isLocal, tzLabel: tzLabel, fields: fields, parseWhen: parseWhen, setLocal: setLocal,
    renderTimes: renderTimes };
})();
