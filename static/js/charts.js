/* minard dashboard: shared helpers for the data pages (Stream, Detector, Nhit, Runs).
 *
 * - view state in the URL query (every view is a permalink): read with
 *   MC.params(), written with MC.setParams() (history.replaceState);
 * - the time-window toolbar (presets, pan, live, zoom) on top of that state;
 * - uPlot time charts with run/subrun boundaries drawn on every plot;
 * - the d3 channel map (19 crates x 16 cards x 32 channels) with drill-down.
 *
 * Data is always written with textContent / SVG attributes, never as HTML.
 */
(function () {
  "use strict";

  var m = window.minard;
  var NCRATES = 19, NCARDS = 16, NCHANNELS = 32;
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
    "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8", "#969696", "#9c9ede",
    "#cedb9c", "#000000"];
  var UNITS = { s: 1, m: 60, h: 3600, d: 86400, w: 604800, y: 31536000 };

  // -- URL state ------------------------------------------------------------------

  /** The page's query parameters as a plain object of strings. */
  function params() {
    var out = {};
    new URLSearchParams(window.location.search).forEach(function (v, k) { out[k] = v; });
    return out;
  }

  /** Replace the query with *obj* (keys with null/undefined/"" values are dropped). */
  function setParams(obj) {
    var q = new URLSearchParams();
    Object.keys(obj).forEach(function (k) {
      if (obj[k] !== null && obj[k] !== undefined && obj[k] !== "") q.set(k, String(obj[k]));
    });
    var s = q.toString();
    window.history.replaceState(null, "", window.location.pathname + (s ? "?" + s : ""));
  }

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
    var mt = /^(\d+(?:\.\d+)?)([smhdwy]?)$/.exec(String(text || ""));
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

  // -- time window -----------------------------------------------------------------

  /**
   * The time window of the view from the URL: live (?window=1h, stop = now)
   * or fixed (?start=...&stop=..., Unix seconds).
   */
  function TimeWindow(defaultWindow) {
    var p = params();
    this.defaultWindow = defaultWindow || "10m";
    this.start = p.start && isFinite(+p.start) ? +p.start : null;
    this.stop = p.stop && isFinite(+p.stop) ? +p.stop : null;
    this.window = p.window || this.defaultWindow;
    if (!(seconds(this.window) > 0)) this.window = this.defaultWindow;
    this.live = this.start === null || this.stop === null;
    if (!this.live && this.stop <= this.start) this.live = true;
  }

  TimeWindow.prototype.span = function () {
    return this.live ? seconds(this.window) : this.stop - this.start;
  };

  /** API parameters of this window. */
  TimeWindow.prototype.apiParams = function () {
    return this.live ? { window: this.window } : { start: Math.floor(this.start), stop: Math.ceil(this.stop) };
  };

  /** URL parameters of this window (same as apiParams). */
  TimeWindow.prototype.urlParams = TimeWindow.prototype.apiParams;

  TimeWindow.prototype.setFixed = function (start, stop) {
    var now = Date.now() / 1000;
    stop = Math.min(stop, now);
    if (stop - start < 10) { var mid = (start + stop) / 2; start = mid - 5; stop = mid + 5; }
    this.start = start; this.stop = stop; this.live = false;
  };

  TimeWindow.prototype.setLive = function (win) {
    this.window = win || this.window; this.start = this.stop = null; this.live = true;
  };

  /** Shift the window by *fraction* of its span (negative = back in time). */
  TimeWindow.prototype.pan = function (fraction) {
    var now = Date.now() / 1000, span = this.span();
    var stop = (this.live ? now : this.stop) + fraction * span;
    if (stop >= now) { this.setLive(this.live ? this.window : durationLabel(Math.round(span))); return; }
    this.setFixed(stop - span, stop);
  };

  TimeWindow.prototype.describe = function () {
    if (this.live) return "live, last " + this.window;
    return m.when(this.start) + " \u2192 " + m.when(this.stop);
  };

  /**
   * Wire the toolbar of a page: window presets (button[data-window]),
   * #pan-back, #pan-fwd, #go-live; *onChange* is called after every change.
   */
  function toolbar(tw, onChange) {
    document.querySelectorAll("button[data-window]").forEach(function (b) {
      b.addEventListener("click", function () { tw.setLive(b.dataset.window); onChange(); });
    });
    bind("pan-back", function () { tw.pan(-0.5); onChange(); });
    bind("pan-fwd", function () { tw.pan(0.5); onChange(); });
    bind("go-live", function () { tw.setLive(); onChange(); });
    showWindow(tw);
  }

  function bind(id, fn) {
    var node = document.getElementById(id);
    if (node) node.addEventListener("click", fn);
  }

  /** Mark the active preset and print the window. */
  function showWindow(tw) {
    document.querySelectorAll("button[data-window]").forEach(function (b) {
      b.classList.toggle("active", tw.live && b.dataset.window === tw.window);
    });
    var label = document.getElementById("window-label");
    if (label) label.textContent = tw.describe();
    var live = document.getElementById("go-live");
    if (live) live.classList.toggle("active", tw.live);
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

  function color(i) { return PALETTE[i % PALETTE.length]; }

  // -- time charts -----------------------------------------------------------------

  /** uPlot plugin drawing run (solid) and subrun (dashed) boundaries. */
  function boundaryPlugin(getMarks) {
    return {
      hooks: {
        draw: function (u) {
          var marks = getMarks() || [];
          var ctx = u.ctx, top = u.bbox.top, bottom = u.bbox.top + u.bbox.height;
          var xmin = u.scales.x.min, xmax = u.scales.x.max;
          ctx.save();
          ctx.font = Math.round(11 * devicePixelRatio) + "px sans-serif";
          marks.forEach(function (mk) {
            if (mk.t < xmin || mk.t > xmax) return;
            var x = Math.round(u.valToPos(mk.t, "x", true));
            var run = mk.kind === "run";
            ctx.strokeStyle = run ? "#c62828" : "#7b8794";
            ctx.lineWidth = (run ? 2 : 1) * devicePixelRatio;
            ctx.setLineDash(run ? [] : [4 * devicePixelRatio, 3 * devicePixelRatio]);
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
            ctx.fillStyle = ctx.strokeStyle;
            ctx.fillText(run ? "run " + mk.run : "sub " + mk.subrun, x + 3 * devicePixelRatio, top + 12 * devicePixelRatio);
          });
          ctx.restore();
        }
      }
    };
  }

  /**
   * A uPlot time chart in *el*.  opts: names (series labels), unit, log,
   * marks (function returning boundaries), onZoom(start, stop), height.
   * Returns {plot, setData(t, arrays)}.
   */
  function timeChart(el, opts) {
    el.replaceChildren();
    var width = Math.max(300, el.clientWidth || 900);
    var series = [{}].concat(opts.names.map(function (n, i) {
      return { label: n, stroke: opts.colors ? opts.colors[i] : color(i), width: 1.5, spanGaps: false,
        value: function (u, v) { return fmt(v); } };
    }));
    var cfg = {
      width: width, height: opts.height || 220, series: series,
      scales: { x: { time: true }, y: opts.log ? { distr: 3 } : { auto: true } },
      axes: [{}, { label: opts.unit || "", size: 70 }],
      cursor: { drag: { x: true, y: false, setScale: false }, sync: { key: opts.sync || "minard" } },
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
    return {
      plot: plot,
      setData: function (t, arrays) {
        var ys = arrays.map(function (a) {
          return opts.log ? a.map(function (v) { return v > 0 ? v : null; }) : a;
        });
        plot.setData([t].concat(ys));
        el.dataset.points = String(t.length);
      },
      resize: function () { plot.setSize({ width: Math.max(300, el.clientWidth), height: opts.height || 220 }); }
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
   * Draw the channel map into *el* (an element; an SVG is created in it).
   * opts: values (9728), hot, dead (arrays of lcn), crate/card (null = overview),
   * onCrate(c), onCard(c, k), onChannel(lcn), unit.
   */
  function channelMap(el, opts) {
    var values = opts.values;
    var scale = valueScale(values);
    var hot = new Set(opts.hot || []), dead = new Set(opts.dead || []);
    var flags = opts.flags || {};  // lcn -> [flag, ...] from the channel-status database
    el.replaceChildren();
    var svg = d3.select(el).append("svg").attr("class", "chmap");
    var cells;
    if (opts.crate === null || opts.crate === undefined) {
      cells = overview(svg, values, opts);
    } else if (opts.card === null || opts.card === undefined) {
      cells = crateView(svg, values, opts);
    } else {
      cells = cardView(svg, values, opts, scale);
    }
    cells.attr("data-lcn", function (d) { return d.lcn; })
      .attr("class", function (d) {
        return "cell" + (hot.has(d.lcn) ? " hot" : "") + (dead.has(d.lcn) ? " dead" : "") +
          (values[d.lcn] === null ? " nodata" : "") + (flags[d.lcn] ? " flagged-channel" : "");
      })
      .attr("fill", function (d) { return values[d.lcn] === null ? "#d9dde1" : scale(values[d.lcn]); })
      .on("click", function (ev, d) { if (opts.onChannel) opts.onChannel(d.lcn); });
    cells.append("title").text(function (d) {
      var p = parts(d.lcn);
      return "crate " + p.crate + " card " + p.card + " channel " + p.channel + " (lcn " + d.lcn + "): " +
        fmt(values[d.lcn], 5) + " " + (opts.unit || "") + (hot.has(d.lcn) ? " HOT" : "") + (dead.has(d.lcn) ? " DEAD" : "") +
        (flags[d.lcn] ? " flagged: " + flags[d.lcn].join(", ") : "");
    });
    legend(svg, scale, opts.unit);
    return svg;
  }

  function range(n) { var a = []; for (var i = 0; i < n; i++) a.push(i); return a; }

  function overview(svg, values, opts) {
    var cw = 4, ch = 3, pw = NCARDS * cw, ph = NCHANNELS * ch, gx = 14, gy = 30, per = 10;
    svg.attr("width", per * (pw + gx) + 10).attr("height", 2 * (ph + gy) + 50);
    var panels = svg.selectAll("g.crate").data(range(NCRATES)).join("g")
      .attr("class", "crate")
      .attr("data-crate", function (c) { return c; })
      .attr("transform", function (c) { return "translate(" + (5 + (c % per) * (pw + gx)) + "," + (18 + Math.floor(c / per) * (ph + gy)) + ")"; });
    panels.append("text").attr("class", "crate-label").attr("x", 0).attr("y", -4)
      .text(function (c) { return "crate " + c; })
      .on("click", function (ev, c) { if (opts.onCrate) opts.onCrate(c); });
    return panels.selectAll("rect").data(function (c) {
      return range(512).map(function (i) { return { lcn: c * 512 + i, card: Math.floor(i / 32), channel: i % 32 }; });
    }).join("rect")
      .attr("x", function (d) { return d.card * cw; }).attr("y", function (d) { return d.channel * ch; })
      .attr("width", cw - 0.5).attr("height", ch - 0.5);
  }

  function crateView(svg, values, opts) {
    var cw = 40, ch = 13, top = 34;
    svg.attr("width", NCARDS * cw + 60).attr("height", NCHANNELS * ch + top + 50);
    var g = svg.append("g").attr("transform", "translate(40," + top + ")");
    g.selectAll("text.card-label").data(range(NCARDS)).join("text")
      .attr("class", "card-label").attr("data-card", function (k) { return k; })
      .attr("x", function (k) { return k * cw + cw / 2; }).attr("y", -8).attr("text-anchor", "middle")
      .text(function (k) { return "card " + k; })
      .on("click", function (ev, k) { if (opts.onCard) opts.onCard(opts.crate, k); });
    g.selectAll("text.ch-label").data([0, 8, 16, 24, 31]).join("text").attr("class", "axis-label")
      .attr("x", -6).attr("y", function (k) { return k * ch + ch - 2; }).attr("text-anchor", "end")
      .text(function (k) { return "ch " + k; });
    return g.selectAll("rect").data(range(512).map(function (i) {
      return { lcn: opts.crate * 512 + i, card: Math.floor(i / 32), channel: i % 32 };
    })).join("rect")
      .attr("x", function (d) { return d.card * cw; }).attr("y", function (d) { return d.channel * ch; })
      .attr("width", cw - 2).attr("height", ch - 1.5);
  }

  function cardView(svg, values, opts, scale) {
    var bw = 24, h = 260, top = 20, left = 60;
    var base = opts.baseline || [];
    var lo = opts.crate * 512 + opts.card * 32;
    var data = range(NCHANNELS).map(function (i) { return { lcn: lo + i, channel: i }; });
    var vals = data.map(function (d) { return values[d.lcn]; }).concat(data.map(function (d) { return base[d.lcn]; }))
      .filter(function (x) { return x !== null && x !== undefined && isFinite(x); });
    var y = d3.scaleLinear().domain([Math.min(0, d3.min(vals) || 0), (d3.max(vals) || 1) * 1.1 || 1]).range([h, 0]).nice();
    svg.attr("width", left + NCHANNELS * bw + 20).attr("height", h + top + 60);
    var g = svg.append("g").attr("transform", "translate(" + left + "," + top + ")");
    y.ticks(5).forEach(function (t) {
      g.append("text").attr("class", "axis-label").attr("x", -6).attr("y", y(t) + 4).attr("text-anchor", "end").text(fmt(t));
      g.append("line").attr("class", "grid-line").attr("x1", 0).attr("x2", NCHANNELS * bw).attr("y1", y(t)).attr("y2", y(t));
    });
    g.selectAll("text.ch").data(data).join("text").attr("class", "axis-label")
      .attr("x", function (d) { return d.channel * bw + bw / 2; }).attr("y", h + 14).attr("text-anchor", "middle")
      .text(function (d) { return d.channel; });
    g.selectAll("line.base").data(data.filter(function (d) { return base[d.lcn] !== null && base[d.lcn] !== undefined; }))
      .join("line").attr("class", "baseline-mark")
      .attr("x1", function (d) { return d.channel * bw; }).attr("x2", function (d) { return d.channel * bw + bw - 3; })
      .attr("y1", function (d) { return y(base[d.lcn]); }).attr("y2", function (d) { return y(base[d.lcn]); });
    return g.selectAll("rect").data(data, function (d) { return d.lcn; }).join("rect")
      .attr("x", function (d) { return d.channel * bw; }).attr("width", bw - 3)
      .attr("y", function (d) { var v = values[d.lcn]; return v === null ? h - 2 : y(Math.max(v, y.domain()[0] < 0 ? v : 0)); })
      .attr("height", function (d) { var v = values[d.lcn]; return v === null ? 2 : Math.max(1, Math.abs(y(v) - y(0))); })
      .lower();
  }

  /** A colour bar with its range, drawn under the map. */
  function legend(svg, scale, unit) {
    var w = 200, h = 10;
    var height = +svg.attr("height");
    var id = "grad-" + Math.random().toString(36).slice(2);
    var grad = svg.append("defs").append("linearGradient").attr("id", id);
    d3.range(0, 1.01, 0.1).forEach(function (f) {
      grad.append("stop").attr("offset", (f * 100) + "%").attr("stop-color", d3.interpolateViridis(f));
    });
    var g = svg.append("g").attr("class", "legend").attr("transform", "translate(10," + (height - 26) + ")");
    g.append("rect").attr("width", w).attr("height", h).attr("fill", "url(#" + id + ")");
    var dom = scale.domain();
    g.append("text").attr("x", 0).attr("y", h + 12).text(fmt(dom[0]));
    g.append("text").attr("x", w).attr("y", h + 12).attr("text-anchor", "end").text(fmt(dom[1]) + " " + (unit || ""));
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

  window.MC = {
    params: params, setParams: setParams, query: query, seconds: seconds, durationLabel: durationLabel,
    TimeWindow: TimeWindow, toolbar: toolbar, showWindow: showWindow, setDownloads: setDownloads,
    fmt: fmt, color: color, timeChart: timeChart, channelMap: channelMap, parts: parts, fillRows: fillRows
  };
})();
