/* minard dashboard: shared helpers for the data pages (Stream, Detector, Nhit, Runs).
 *
 * - view state in the URL query (every view is a permalink): read with
 *   MC.params(), written with MC.setParams() (a new history entry for every
 *   zoom, pan or window change, so Back undoes it);
 * - the time-window toolbar (presets, pan, live, zoom out, typed range such
 *   as now-6h or a date-time) on top of that state;
 * - uPlot time charts in UTC or the browser's local time (minard.js), 24-hour
 *   ticks and readouts with seconds, run/subrun boundaries whose labels never
 *   overlap, one colour-blind-safe style per trigger type;
 * - the d3 channel map (20 crates x 16 cards x 32 channels) at the element's
 *   width, with drill-down, hover readout and keyboard navigation.
 *
 * Data is always written with textContent / SVG attributes, never as HTML.
 */
(function () {
  "use strict";

  var m = window.minard;
  var NCRATES = 20, NCARDS = 16, NCHANNELS = 32;
  /**
   * Series styles: Paul Tol's colour-blind-safe "muted" palette (9 colours)
   * times three dash patterns gives the 27 trigger types one distinct style
   * each; TOTAL is black.  A trigger keeps its style on every page (indexed
   * by its position in TRIGGERS, never by the order a page lists it).
   */
  var PALETTE = ["#332288", "#CC6677", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499", "#DDAA33"];
  var DASHES = [null, [8, 4], [2, 3]];
  var TRIGGERS = ["100L", "100M", "100H", "20", "20LB", "ESUML", "ESUMH", "OWLN", "OWLEL", "OWLEH", "PULGT",
    "PRESCL", "PED", "PONG", "SYNC", "EXTA", "EXT2", "EXT3", "EXT4", "EXT5", "EXT6", "EXT7", "EXT8", "SRAW",
    "NCD", "SOFGT", "MISS", "TOTAL"];
  var UNITS = { s: 1, m: 60, h: 3600, d: 86400, w: 604800, y: 31536000 };

  // -- URL state ------------------------------------------------------------------

  /** The page's query parameters as a plain object of strings. */
  function params() {
    var out = {};
    new URLSearchParams(window.location.search).forEach(function (v, k) { out[k] = v; });
    return out;
  }

  /**
   * Put *obj* in the query (keys with null/undefined/"" values are dropped).
   * With *push*, a new history entry (so Back returns to the previous view);
   * otherwise the current entry is replaced.
   */
  function setParams(obj, push) {
    var s = query(obj);
    var url = window.location.pathname + (s ? "?" + s : "");
    if (push && url !== window.location.pathname + window.location.search) window.history.pushState(null, "", url);
    else window.history.replaceState(null, "", url);
  }

  /** Numbers of a base64 little-endian float array of *size*-byte values, each through
   *  *value*; NaN and infinities -> null (the JSON's null). */
  function unpackFloats(b64, size, value) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var dv = new DataView(bytes.buffer), out = new Array(Math.floor(bytes.length / size));
    for (var j = 0; j < out.length; j++) {
      var x = size === 4 ? dv.getFloat32(4 * j, true) : dv.getFloat64(8 * j, true);
      out[j] = isFinite(x) ? value(x) : null;
    }
    return out;
  }

  /** encoding=f32: each value to 5 significant figures, as the server rounded it (float32
   *  holds 6, so this is the plain JSON's value). */
  function unpackF32(b64) { return unpackFloats(b64, 4, function (x) { return Number(x.toPrecision(5)); }); }

  /** encoding=f64: the plain JSON's values exactly. */
  function unpackF64(b64) { return unpackFloats(b64, 8, function (x) { return x; }); }

  /** A query string from an object, same dropping rule as setParams. */
  function query(obj) {
    var q = new URLSearchParams();
    Object.keys(obj).forEach(function (k) {
      if (obj[k] !== null && obj[k] !== undefined && obj[k] !== "") q.set(k, String(obj[k]));
    });
    return q.toString();
  }

  /** Seconds of a duration such as "600", "10m", "1d". */
  function seconds(text) {
    var mt = /^(\d+(?:\.\d+)?)([smhdwy]?)$/.exec(String(text || "").trim());
    return mt ? parseFloat(mt[1]) * UNITS[mt[2] || "s"] : NaN;
  }

  /** "10m", "1h"... for a number of seconds. */
  function durationLabel(s) {
    var order = ["y", "w", "d", "h", "m"];
    for (var i = 0; i < order.length; i++) {
      var u = UNITS[order[i]];
      if (s >= u && s % u === 0) return (s / u) + order[i];
    }
    return Math.round(s) + "s";
  }

  /**
   * Epoch seconds of a typed time: "now", "now-6h", "now-90m", a date-time
   * (read in the zone shown, see minard.parseWhen) or Unix seconds; NaN if none.
   */
  function parseTyped(raw, now) {
    var text = String(raw || "").trim().toLowerCase().replace(/\s+/g, "");
    if (text === "" || text === "now") return now;
    var rel = /^now-(\d+(?:\.\d+)?[smhdwy]?)$/.exec(text);
    if (rel) return now - seconds(rel[1]);
    if (/^\d{9,11}(\.\d+)?$/.test(text)) return parseFloat(text);
    return m.parseWhen(String(raw).trim());
  }

  // -- time window -----------------------------------------------------------------

  /**
   * The time window of the view from the URL: live (?window=1h, stop = now)
   * or fixed (?start=...&stop=..., Unix seconds).  Every change by the user
   * (preset, pan, zoom, zoom out, typed range) marks it so that the page's
   * next URL update is a new history entry: Back undoes it.
   */
  function TimeWindow(defaultWindow) {
    this.defaultWindow = defaultWindow || "10m";
    this.pending = false;
    this.readUrl();
  }

  /** (Re)read the window from the URL (also after Back/Forward). */
  TimeWindow.prototype.readUrl = function () {
    var p = params();
    this.start = p.start && isFinite(+p.start) ? +p.start : null;
    this.stop = p.stop && isFinite(+p.stop) ? +p.stop : null;
    this.window = p.window || this.defaultWindow;
    if (!(seconds(this.window) >= 10)) this.window = this.defaultWindow;
    this.live = this.start === null || this.stop === null;
    if (!this.live && this.stop <= this.start) this.live = true;
  };

  TimeWindow.prototype.span = function () {
    return this.live ? seconds(this.window) : this.stop - this.start;
  };

  /** [start, stop] shown now. */
  TimeWindow.prototype.range = function () {
    var now = Date.now() / 1000;
    return this.live ? [now - this.span(), now] : [this.start, this.stop];
  };

  /** API parameters of this window. */
  TimeWindow.prototype.apiParams = function () {
    return this.live ? { window: this.window } : { start: Math.floor(this.start), stop: Math.ceil(this.stop) };
  };

  /** URL parameters of this window (same as apiParams). */
  TimeWindow.prototype.urlParams = TimeWindow.prototype.apiParams;

  /** True once after a user change: the caller pushes a history entry. */
  TimeWindow.prototype.takePush = function () {
    var p = this.pending;
    this.pending = false;
    return p;
  };

  TimeWindow.prototype.setFixed = function (start, stop) {
    var now = Date.now() / 1000;
    stop = Math.min(stop, now);
    if (stop - start < 10) { var mid = (start + stop) / 2; start = mid - 5; stop = mid + 5; }
    this.start = start; this.stop = stop; this.live = false; this.pending = true;
  };

  TimeWindow.prototype.setLive = function (win) {
    this.window = win || this.window; this.start = this.stop = null; this.live = true; this.pending = true;
  };

  /** Shift the window by *fraction* of its span (negative = back in time). */
  TimeWindow.prototype.pan = function (fraction) {
    var now = Date.now() / 1000, span = this.span();
    var stop = (this.live ? now : this.stop) + fraction * span;
    if (stop >= now) { this.setLive(this.live ? this.window : durationLabel(Math.round(span))); return; }
    this.setFixed(stop - span, stop);
  };

  /** Twice the span around the same middle (live stays live). */
  TimeWindow.prototype.zoomOut = function () {
    var now = Date.now() / 1000, span = Math.min(this.span() * 2, 400 * 86400);
    if (this.live) { this.setLive(durationLabel(Math.round(span))); return; }
    var mid = (this.start + this.stop) / 2, stop = mid + span / 2;
    if (stop >= now - 1) { this.setLive(durationLabel(Math.round(span))); return; }
    this.setFixed(stop - span, stop);
  };

  TimeWindow.prototype.describe = function () {
    if (this.live) return "live, last " + this.window;
    return m.when(this.start) + " \u2192 " + m.when(this.stop) + " " + m.tzLabel();
  };

  /**
   * Wire the toolbar of a page: window presets (button[data-window]),
   * #pan-back, #pan-fwd, #go-live, #zoom-out, the typed range (#range-form)
   * and Back/Forward; *onChange* is called after every change.
   */
  function toolbar(tw, onChange) {
    document.querySelectorAll("button[data-window]").forEach(function (b) {
      b.addEventListener("click", function () { tw.setLive(b.dataset.window); onChange(); });
    });
    bind("pan-back", function () { tw.pan(-0.5); onChange(); });
    bind("pan-fwd", function () { tw.pan(0.5); onChange(); });
    bind("go-live", function () { tw.setLive(); onChange(); });
    bind("zoom-out", function () { tw.zoomOut(); onChange(); });
    var form = document.getElementById("range-form");
    if (form) form.addEventListener("submit", function (e) {
      e.preventDefault();
      if (applyRange(tw)) onChange();
    });
    window.addEventListener("popstate", function () { tw.readUrl(); onChange({ history: true }); });
    document.addEventListener("minard:tz", function () { showWindow(tw); });
    showWindow(tw);
  }

  /** Apply the typed range; false (with the reason shown) if it cannot be read. */
  function applyRange(tw) {
    var from = document.getElementById("range-from"), to = document.getElementById("range-to");
    var err = document.getElementById("range-error");
    var now = Date.now() / 1000;
    var a = parseTyped(from.value, now), b = parseTyped(to.value, now);
    var msg = "";
    if (isNaN(a)) msg = "From: use now-6h, a date-time such as 2026-05-01 12:00:00, or Unix seconds";
    else if (isNaN(b)) msg = "To: use now, now-1h, a date-time or Unix seconds";
    else if (b - a < 10) msg = "the range must be at least 10 s long";
    else if (b - a > 400 * 86400) msg = "the range must be at most 400 days long";
    if (err) err.textContent = msg;
    if (msg) return false;
    var toNow = /^\s*(now)?\s*$/i.test(to.value);
    if (toNow && /^\s*now-/i.test(from.value)) tw.setLive(durationLabel(Math.round(now - a)));
    else tw.setFixed(a, Math.min(b, now));
    return true;
  }

  function bind(id, fn) {
    var node = document.getElementById(id);
    if (node) node.addEventListener("click", fn);
  }

  /** Mark the active preset, print the window and put it in the range inputs. */
  function showWindow(tw) {
    document.querySelectorAll("button[data-window]").forEach(function (b) {
      b.classList.toggle("active", tw.live && b.dataset.window === tw.window);
    });
    var label = document.getElementById("window-label");
    if (label) label.textContent = tw.describe();
    var live = document.getElementById("go-live");
    if (live) live.classList.toggle("active", tw.live);
    var from = document.getElementById("range-from"), to = document.getElementById("range-to");
    if (from && document.activeElement !== from && document.activeElement !== to) {
      from.value = tw.live ? "now-" + tw.window : m.when(tw.start);
      to.value = tw.live ? "now" : m.when(tw.stop);
    }
  }

  /** Point the CSV/JSON download links at the API URL of what is shown. */
  function setDownloads(path, apiParams) {
    var csv = document.getElementById("download-csv");
    var js = document.getElementById("download-json");
    var p = Object.assign({}, apiParams);
    if (csv) csv.href = path + "?" + query(Object.assign({}, p, { format: "csv" }));
    if (js) js.href = path + "?" + query(Object.assign({}, p, { download: "1" }));
  }

  // -- formatting ------------------------------------------------------------------

  /** A number for display (null -> "-"). */
  function fmt(v, digits) {
    if (v === null || v === undefined || isNaN(v)) return "-";
    if (digits === undefined) digits = 3;
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    return (+v.toFixed(digits)).toLocaleString("en-US", { maximumFractionDigits: digits });
  }

  /**
   * A formatter giving every number of a column the same decimals: about
   * *sig* significant figures for the largest, no thousands separators
   * (so "891" sits beside "2969", never "891.3366" beside "2,969").
   */
  function columnFormat(values, sig) {
    sig = sig || 4;
    var max = 0;
    values.forEach(function (v) { if (v !== null && v !== undefined && isFinite(v)) max = Math.max(max, Math.abs(v)); });
    var dec = max > 0 ? Math.min(8, Math.max(0, sig - 1 - Math.floor(Math.log10(max)))) : 0;
    return function (v) { return v === null || v === undefined || !isFinite(v) ? "-" : v.toFixed(dec); };
  }

  /** "crate 3 · card 4 · ch 26" of a channel number. */
  function channelName(lcn) {
    var p = parts(lcn);
    return "crate " + p.crate + " \u00b7 card " + p.card + " \u00b7 ch " + p.channel;
  }

  /** The colour of series *i* (by position; pages use style(name) for triggers). */
  function color(i) { return PALETTE[i % PALETTE.length]; }

  /** {stroke, dash, width} of a trigger name, the same on every page. */
  function style(name) {
    var i = TRIGGERS.indexOf(name);
    if (name === "TOTAL" || i < 0) return { stroke: "#000000", dash: null, width: 2 };
    return { stroke: PALETTE[i % PALETTE.length], dash: DASHES[Math.floor(i / PALETTE.length)], width: 1.5 };
  }

  // -- time charts -----------------------------------------------------------------

  /** uPlot's Date for an epoch time in the zone shown (ticks fall on whole hours/days there). */
  function tzDate(ts) {
    var d = new Date(ts * 1000);
    return m.isLocal() ? d : uPlot.tzDate(d, "Etc/UTC");
  }

  /** 24-hour tick labels in the zone shown; the date is added where it changes. */
  function timeTicks(u, splits, axisIdx, space, incr) {
    var prevDay = null;
    return splits.map(function (t, i) {
      if (t === null || t === undefined) return null;
      var f = m.fields(t);
      var date = f.y + "-" + (f.mo < 10 ? "0" : "") + f.mo + "-" + (f.d < 10 ? "0" : "") + f.d;
      var hm = (f.h < 10 ? "0" : "") + f.h + ":" + (f.mi < 10 ? "0" : "") + f.mi;
      var out;
      if (incr >= 365 * 86400) out = String(f.y);
      else if (incr >= 28 * 86400) out = date.slice(0, 7);
      else if (incr >= 86400) out = date.slice(5) + (i === 0 || f.y !== prevDay ? "\n" + f.y : "");
      else if (incr >= 60) out = hm + (i === 0 || date !== prevDay ? "\n" + date.slice(5) : "");
      else out = hm + ":" + (f.s < 10 ? "0" : "") + f.s + (i === 0 || date !== prevDay ? "\n" + date.slice(5) : "");
      prevDay = incr >= 86400 && incr < 28 * 86400 ? f.y : date;
      return out;
    });
  }

  /**
   * uPlot plugin drawing run (solid red) and subrun (dashed grey) boundaries.
   * Labels never overlap: each goes in the first of three rows where it fits;
   * a label that fits nowhere is left out ("+N" at the right) and every
   * boundary's full text is shown on hover (the plot's tooltip).
   */
  function boundaryPlugin(getMarks) {
    var placed = [];
    return {
      hooks: {
        draw: function (u) {
          var marks = (getMarks() || []).filter(function (mk) { return mk.t >= u.scales.x.min && mk.t <= u.scales.x.max; });
          var dpr = devicePixelRatio, ctx = u.ctx, top = u.bbox.top, bottom = u.bbox.top + u.bbox.height;
          var rows = [-1e9, -1e9, -1e9], hidden = 0, boxes = [];
          placed = [];
          ctx.save();
          ctx.font = Math.round(11 * dpr) + "px sans-serif";
          marks.forEach(function (mk) {
            var x = Math.round(u.valToPos(mk.t, "x", true));
            var run = mk.kind === "run";
            ctx.strokeStyle = run ? "#c62828" : "#7b8794";
            ctx.lineWidth = (run ? 2 : 1) * dpr;
            ctx.setLineDash(run ? [] : [4 * dpr, 3 * dpr]);
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
            placed.push({ x: u.valToPos(mk.t, "x"), mk: mk });  // CSS px in the plotting area, like cursor.left
            var text = run ? "run " + mk.run : "sub " + mk.subrun;
            var w = ctx.measureText(text).width, lx = x + 3 * dpr;
            if (lx + w > u.bbox.left + u.bbox.width) lx = x - 3 * dpr - w;
            for (var r = 0; r < rows.length; r++) {
              if (lx > rows[r] + 4 * dpr) {
                ctx.fillStyle = ctx.strokeStyle;
                ctx.fillText(text, lx, top + (12 + 12 * r) * dpr);
                rows[r] = lx + w;
                boxes.push([r, Math.round(lx / dpr), Math.round((lx + w) / dpr)]);
                return;
              }
            }
            hidden += 1;
          });
          if (hidden) {
            ctx.fillStyle = "#5f6b76";
            ctx.fillText("+" + hidden + " more (hover)", u.bbox.left + u.bbox.width - 90 * dpr, bottom - 4 * dpr);
          }
          u.root.dataset.marks = String(marks.length);
          u.root.dataset.hiddenLabels = String(hidden);
          u.root.dataset.labelBoxes = JSON.stringify(boxes);  // [row, left, right] in CSS px, for tests
          ctx.restore();
        },
        setCursor: function (u) {
          var x = u.cursor.left, near = placed.filter(function (p) { return Math.abs(p.x - x) <= 4; });
          u.over.title = near.map(function (p) {
            var mk = p.mk;
            return (mk.kind === "run" ? "run " + mk.run + " starts" : "run " + mk.run + " subrun " + mk.subrun + " starts") +
              " " + m.when(mk.t) + " " + m.tzLabel();
          }).join("\n");
        }
      }
    };
  }

  /**
   * A uPlot time chart in *el*.  opts: names (series labels), styles
   * ({stroke, dash, width} per name), unit, log, marks (function returning
   * boundaries), onZoom(start, stop), onZoomOut(), height.
   * Returns {plot, setData(t, arrays), resize()}.
   */
  function timeChart(el, opts) {
    el.replaceChildren();
    var width = Math.max(260, el.clientWidth || 900);
    var series = [{ label: "time", value: function (u, v) { return v === null || v === undefined ? "-" : m.when(v); } }]
      .concat(opts.names.map(function (n, i) {
        var st = opts.styles ? opts.styles[i] : { stroke: opts.colors ? opts.colors[i] : color(i), dash: null, width: 1.5 };
        var s = { label: n, stroke: st.stroke, width: st.width || 1.5, spanGaps: false, value: function (u, v) { return fmt(v); } };
        if (st.dash) s.dash = st.dash;
        return s;
      }));
    var cfg = {
      width: width, height: opts.height || 220, series: series, tzDate: tzDate,
      scales: { x: { time: true }, y: opts.log ? { distr: 3 } : { auto: true } },
      axes: [{ space: 90, values: timeTicks, label: "time (" + m.tzLabel() + ")", labelSize: 18, size: 46 },
        { label: opts.unit || "", size: 70 }],
      cursor: {
        drag: { x: true, y: false, setScale: false }, sync: { key: opts.sync || "minard" },
        bind: { dblclick: function () { return function () { if (opts.onZoomOut) opts.onZoomOut(); return null; }; } }
      },
      legend: { live: true },
      plugins: [boundaryPlugin(opts.marks || function () { return []; })],
      hooks: {
        setSelect: [function (u) {
          if (u.select.width < 3 || !opts.onZoom) return;
          var a = u.posToVal(u.select.left, "x"), b = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
          opts.onZoom(a, b);
        }]
      }
    };
    var plot = new uPlot(cfg, [[]].concat(opts.names.map(function () { return []; })), el);
    el.dataset.points = "0";
    el.uplot = plot;  // the page's tests read ticks and series styles from it
    return {
      plot: plot,
      setData: function (t, arrays) {
        var ys = arrays.map(function (a) {
          return opts.log ? a.map(function (v) { return v > 0 ? v : null; }) : a;
        });
        plot.setData([t].concat(ys));
        el.dataset.points = String(t.length);
      },
      resize: function () { plot.setSize({ width: Math.max(260, el.clientWidth), height: opts.height || 220 }); }
    };
  }

  // -- channel map -------------------------------------------------------------------

  /** Colour scale of a per-channel array: viridis over [min, 99th percentile]. */
  function valueScale(values) {
    var v = values.filter(function (x) { return x !== null && isFinite(x); }).sort(d3.ascending);
    var lo = v.length ? v[0] : 0;
    var hi = v.length ? d3.quantileSorted(v, 0.99) : 1;
    if (!(hi > lo)) hi = lo + (Math.abs(lo) || 1);
    return d3.scaleSequential(d3.interpolateViridis).domain([lo, hi]).clamp(true);
  }

  /** lcn -> {crate, card, channel}. */
  function parts(lcn) {
    return { crate: Math.floor(lcn / 512), card: Math.floor(lcn / 32) % 16, channel: lcn % 32 };
  }

  /**
   * Draw the channel map into *el* at the element's full width (an SVG is
   * created in it; redraw on resize).  opts: values (10240), baseline, hot,
   * dead (arrays of lcn), crate/card (null = overview), onCrate(c),
   * onCard(c, k), onChannel(lcn), unit, readout (element for the hover
   * readout), cursor (lcn the keyboard cursor starts on).
   *
   * Hover or keyboard focus shows crate/card/channel, value, baseline and
   * flags in the readout; with the map focused the arrow keys move between
   * cards (left/right) and channels (up/down), PageUp/PageDown between
   * crates, Enter opens the channel's history.
   */
  function channelMap(el, opts) {
    var values = opts.values;
    var scale = valueScale(values);
    var hot = new Set(opts.hot || []), dead = new Set(opts.dead || []);
    var flags = opts.flags || {};  // lcn -> [flag, ...] from the channel-status database
    var width = Math.max(240, Math.floor(el.clientWidth || el.parentNode.clientWidth || 900));
    el.replaceChildren();
    var svg = d3.select(el).append("svg").attr("class", "chmap").attr("width", width);
    var layout;
    if (opts.crate === null || opts.crate === undefined) layout = overview(svg, values, opts, width);
    else if (opts.card === null || opts.card === undefined) layout = crateView(svg, values, opts, width);
    else layout = cardView(svg, values, opts, scale, width);
    var cells = layout.cells;
    cells.attr("data-lcn", function (d) { return d.lcn; })
      .attr("class", function (d) {
        return "cell" + (hot.has(d.lcn) ? " hot" : "") + (dead.has(d.lcn) ? " dead" : "") +
          (values[d.lcn] === null ? " nodata" : "") + (flags[d.lcn] ? " flagged-channel" : "");
      })
      .attr("fill", function (d) { return values[d.lcn] === null ? "#d9dde1" : scale(values[d.lcn]); });
    legend(svg, scale, opts.unit, width);
    var cursor = svg.append("rect").attr("class", "kbd-cursor").attr("visibility", "hidden");
    var state = { lcn: null, hover: null };  // keyboard cursor, channel last hovered

    function describe(lcn) {
      var base = opts.baseline ? opts.baseline[lcn] : null;
      var marks = (hot.has(lcn) ? " · HOT" : "") + (dead.has(lcn) ? " · DEAD" : "") + (values[lcn] === null ? " · no data" : "") +
        (flags[lcn] ? " · flagged: " + flags[lcn].join(", ") : "");
      return channelName(lcn) + " (lcn " + lcn + "): " + fmt(values[lcn], 5) + " " + (opts.unit || "") +
        (base !== null && base !== undefined ? ", baseline " + fmt(base, 5) : "") + marks;
    }

    function show(lcn, keyboard) {
      if (keyboard) state.lcn = lcn;
      if (opts.readout) opts.readout.textContent = describe(lcn);
      var node = svg.select("rect.cell[data-lcn='" + lcn + "']").node();
      if (keyboard && node) {
        var b = node.getBBox(), tr = node.parentNode.getAttribute("transform") || "";
        var mt = /translate\(([-\d.]+),([-\d.]+)\)/.exec(tr);
        var ox = mt ? +mt[1] : 0, oy = mt ? +mt[2] : 0;
        cursor.attr("x", b.x + ox - 1.5).attr("y", b.y + oy - 1.5).attr("width", b.width + 3).attr("height", b.height + 3)
          .attr("visibility", "visible");
        el.dataset.cursor = String(lcn);
      }
    }

    svg.on("mouseover", function (ev) {
      var lcn = ev.target.dataset ? ev.target.dataset.lcn : undefined;
      if (lcn === undefined) return;
      state.hover = +lcn;
      if (document.activeElement !== el) show(+lcn, false);  // the keyboard cursor owns the readout while focused
    });
    svg.on("click", function (ev) {
      var lcn = ev.target.dataset ? ev.target.dataset.lcn : undefined;
      if (lcn !== undefined && opts.onChannel) opts.onChannel(+lcn);
    });
    el.tabIndex = 0;
    el.setAttribute("role", "application");
    el.setAttribute("aria-label", "Channel map: arrow keys move between cards and channels, Page Up/Down between crates, Enter opens the channel");
    el.onkeydown = function (ev) {
      var lcn = state.lcn === null ? layout.first : state.lcn;
      var p = parts(lcn), next = null;
      var inView = layout.contains;
      if (ev.key === "ArrowRight") next = layout.step(p, 1, 0, 0);
      else if (ev.key === "ArrowLeft") next = layout.step(p, -1, 0, 0);
      else if (ev.key === "ArrowDown") next = layout.step(p, 0, 1, 0);
      else if (ev.key === "ArrowUp") next = layout.step(p, 0, -1, 0);
      else if (ev.key === "PageDown") next = layout.step(p, 0, 0, 1);
      else if (ev.key === "PageUp") next = layout.step(p, 0, 0, -1);
      else if (ev.key === "Enter" && state.lcn !== null) { if (opts.onChannel) opts.onChannel(state.lcn); ev.preventDefault(); return; }
      else return;
      ev.preventDefault();
      if (next !== null && inView(next)) show(next, true);
    };
    el.onfocus = function () {
      var start = state.lcn !== null ? state.lcn : state.hover !== null ? state.hover :
        (opts.cursor !== null && opts.cursor !== undefined && layout.contains(opts.cursor) ? opts.cursor : layout.first);
      show(start, true);
    };
    return svg;
  }

  function range(n) { var a = []; for (var i = 0; i < n; i++) a.push(i); return a; }

  function clampLcn(c, k, ch) {
    if (c < 0 || c >= NCRATES || k < 0 || k >= NCARDS || ch < 0 || ch >= NCHANNELS) return null;
    return c * 512 + k * 32 + ch;
  }

  /** All 20 crates: as many crate panels per row as keep cells at least 5 px wide. */
  function overview(svg, values, opts, width) {
    var gx = 12, gy = 26, per = 2;
    [10, 7, 5, 4, 3].some(function (p) {
      if (Math.floor((width - 10 - p * gx) / (p * NCARDS)) >= 5) { per = p; return true; }
      return false;
    });
    var cw = Math.max(3, Math.floor((width - 10 - per * gx) / (per * NCARDS)));
    var ch = Math.max(3, Math.round(cw * 0.6));
    var pw = NCARDS * cw, ph = NCHANNELS * ch, rows = Math.ceil(NCRATES / per);
    svg.attr("height", rows * (ph + gy) + 60);
    var panels = svg.selectAll("g.crate").data(range(NCRATES)).join("g")
      .attr("class", "crate")
      .attr("data-crate", function (c) { return c; })
      .attr("transform", function (c) { return "translate(" + (5 + (c % per) * (pw + gx)) + "," + (18 + Math.floor(c / per) * (ph + gy)) + ")"; });
    panels.append("text").attr("class", "crate-label").attr("x", 0).attr("y", -4).attr("tabindex", 0)
      .text(function (c) { return "crate " + c; })
      .on("click", function (ev, c) { if (opts.onCrate) opts.onCrate(c); })
      .on("keydown", function (ev, c) { if (ev.key === "Enter" && opts.onCrate) opts.onCrate(c); });
    var cells = panels.selectAll("rect").data(function (c) {
      return range(512).map(function (i) { return { lcn: c * 512 + i, card: Math.floor(i / 32), channel: i % 32 }; });
    }).join("rect")
      .attr("x", function (d) { return d.card * cw; }).attr("y", function (d) { return d.channel * ch; })
      .attr("width", cw - (cw > 4 ? 1 : 0.5)).attr("height", ch - (ch > 4 ? 1 : 0.5));
    return {
      cells: cells, first: 0, contains: function () { return true; },
      step: function (p, dk, dch, dc) {
        var k = p.card + dk, c = p.crate + dc, chn = p.channel + dch;
        if (k >= NCARDS) { k = 0; c += 1; } else if (k < 0) { k = NCARDS - 1; c -= 1; }
        return clampLcn(c, k, chn);
      }
    };
  }

  /** One crate: 16 cards as columns, 32 channels as rows, as wide as the element. */
  function crateView(svg, values, opts, width) {
    var left = 44, top = 34, cw = Math.max(12, Math.floor((width - left - 10) / NCARDS)), ch = 13;
    svg.attr("height", NCHANNELS * ch + top + 60);
    var g = svg.append("g").attr("transform", "translate(" + left + "," + top + ")");
    g.selectAll("text.card-label").data(range(NCARDS)).join("text")
      .attr("class", "card-label").attr("data-card", function (k) { return k; }).attr("tabindex", 0)
      .attr("x", function (k) { return k * cw + cw / 2; }).attr("y", -8).attr("text-anchor", "middle")
      .text(function (k) { return cw >= 40 ? "card " + k : String(k); })
      .on("click", function (ev, k) { if (opts.onCard) opts.onCard(opts.crate, k); })
      .on("keydown", function (ev, k) { if (ev.key === "Enter" && opts.onCard) opts.onCard(opts.crate, k); });
    g.selectAll("text.ch-label").data([0, 8, 16, 24, 31]).join("text").attr("class", "axis-label")
      .attr("x", -6).attr("y", function (k) { return k * ch + ch - 2; }).attr("text-anchor", "end")
      .text(function (k) { return "ch " + k; });
    var cells = g.selectAll("rect").data(range(512).map(function (i) {
      return { lcn: opts.crate * 512 + i, card: Math.floor(i / 32), channel: i % 32 };
    })).join("rect")
      .attr("x", function (d) { return d.card * cw; }).attr("y", function (d) { return d.channel * ch; })
      .attr("width", cw - 2).attr("height", ch - 1.5);
    var c = opts.crate;
    return {
      cells: cells, first: c * 512,
      contains: function (lcn) { return Math.floor(lcn / 512) === c; },
      step: function (p, dk, dch) { return clampLcn(c, p.card + dk, p.channel + dch); }
    };
  }

  /** One card: 32 bars with the baseline marked, as wide as the element. */
  function cardView(svg, values, opts, scale, width) {
    var left = 60, top = 20, h = 260, bw = Math.max(6, Math.floor((width - left - 10) / NCHANNELS));
    var base = opts.baseline || [];
    var lo = opts.crate * 512 + opts.card * 32;
    var data = range(NCHANNELS).map(function (i) { return { lcn: lo + i, channel: i }; });
    var vals = data.map(function (d) { return values[d.lcn]; }).concat(data.map(function (d) { return base[d.lcn]; }))
      .filter(function (x) { return x !== null && x !== undefined && isFinite(x); });
    var y = d3.scaleLinear().domain([Math.min(0, d3.min(vals) || 0), (d3.max(vals) || 1) * 1.1 || 1]).range([h, 0]).nice();
    svg.attr("height", h + top + 80);
    var g = svg.append("g").attr("transform", "translate(" + left + "," + top + ")");
    var tick = columnFormat(y.ticks(5));
    y.ticks(5).forEach(function (t) {
      g.append("text").attr("class", "axis-label").attr("x", -6).attr("y", y(t) + 4).attr("text-anchor", "end").text(tick(t));
      g.append("line").attr("class", "grid-line").attr("x1", 0).attr("x2", NCHANNELS * bw).attr("y1", y(t)).attr("y2", y(t));
    });
    g.selectAll("text.ch").data(data.filter(function (d) { return bw >= 14 || d.channel % 4 === 0; })).join("text")
      .attr("class", "axis-label")
      .attr("x", function (d) { return d.channel * bw + bw / 2; }).attr("y", h + 14).attr("text-anchor", "middle")
      .text(function (d) { return d.channel; });
    g.append("text").attr("class", "axis-label").attr("x", NCHANNELS * bw / 2).attr("y", h + 30).attr("text-anchor", "middle")
      .text("channel of crate " + opts.crate + " \u00b7 card " + opts.card);
    g.selectAll("line.base").data(data.filter(function (d) { return base[d.lcn] !== null && base[d.lcn] !== undefined; }))
      .join("line").attr("class", "baseline-mark")
      .attr("x1", function (d) { return d.channel * bw; }).attr("x2", function (d) { return d.channel * bw + bw - 3; })
      .attr("y1", function (d) { return y(base[d.lcn]); }).attr("y2", function (d) { return y(base[d.lcn]); });
    var cells = g.selectAll("rect").data(data, function (d) { return d.lcn; }).join("rect")
      .attr("x", function (d) { return d.channel * bw; }).attr("width", Math.max(2, bw - 3))
      .attr("y", function (d) { var v = values[d.lcn]; return v === null ? h - 2 : y(Math.max(v, y.domain()[0] < 0 ? v : 0)); })
      .attr("height", function (d) { var v = values[d.lcn]; return v === null ? 2 : Math.max(1, Math.abs(y(v) - y(0))); })
      .lower();
    return {
      cells: cells, first: lo,
      contains: function (lcn) { return lcn >= lo && lcn < lo + 32; },
      step: function (p, dk, dch) { var chn = p.channel + dk + dch; return chn >= 0 && chn < 32 ? lo + chn : null; }
    };
  }

  /** A colour bar with its range, drawn under the map. */
  function legend(svg, scale, unit, width) {
    var w = Math.min(200, width - 150), h = 10;
    var height = +svg.attr("height");
    var id = "grad-" + Math.random().toString(36).slice(2);
    var grad = svg.append("defs").append("linearGradient").attr("id", id);
    d3.range(0, 1.01, 0.1).forEach(function (f) {
      grad.append("stop").attr("offset", (f * 100) + "%").attr("stop-color", d3.interpolateViridis(f));
    });
    var g = svg.append("g").attr("class", "legend").attr("transform", "translate(10," + (height - 30) + ")");
    g.append("rect").attr("width", w).attr("height", h).attr("fill", "url(#" + id + ")");
    var dom = scale.domain(), f = columnFormat(dom);
    g.append("text").attr("x", 0).attr("y", h + 12).text(f(dom[0]));
    g.append("text").attr("x", w).attr("y", h + 12).attr("text-anchor", "end").text(f(dom[1]) + " " + (unit || ""));
    g.append("rect").attr("class", "legend-hot").attr("x", w + 20).attr("width", 10).attr("height", 10);
    g.append("text").attr("x", w + 34).attr("y", 9).text("hot");
    g.append("rect").attr("class", "legend-dead").attr("x", w + 70).attr("width", 10).attr("height", 10);
    g.append("text").attr("x", w + 84).attr("y", 9).text("dead");
  }

  /** Fill a <tbody> from rows of cell texts (textContent only). */
  function fillRows(tbody, rows, rowClass) {
    var frag = document.createDocumentFragment();
    rows.forEach(function (cells, i) {
      var tr = m.el("tr", rowClass ? rowClass(i) : null);
      cells.forEach(function (c, j) { tr.appendChild(m.el("td", j > 0 ? "num" : null, c)); });
      frag.appendChild(tr);
    });
    tbody.replaceChildren(frag);
  }

  /** [first, last] index of the bins of a histogram (*sums*, counts per bin) that hold
   * *fraction* of its entries, from its first non-empty bin; null when it is empty.
   * Fits an nhit axis to the data: a few huge events must not squeeze the rest to one pixel. */
  function fitBins(sums, fraction) {
    var total = sums.reduce(function (a, b) { return a + b; }, 0);
    if (!total) return null;
    var lo = 0, hi = sums.length - 1, acc = 0;
    while (lo < sums.length && sums[lo] === 0) lo++;
    for (var i = 0; i < sums.length; i++) { acc += sums[i]; if (acc >= fraction * total) { hi = i; break; } }
    return [lo, hi];
  }

  window.MC = {
    params: params, setParams: setParams, query: query, seconds: seconds, durationLabel: durationLabel,
    parseTyped: parseTyped, TimeWindow: TimeWindow, toolbar: toolbar, showWindow: showWindow,
    setDownloads: setDownloads, fmt: fmt, columnFormat: columnFormat, channelName: channelName, color: color,
    style: style, TRIGGERS: TRIGGERS, timeChart: timeChart, channelMap: channelMap, parts: parts, fillRows: fillRows,
    unpackF32: unpackF32, unpackF64: unpackF64, fitBins: fitBins
  };
})();
