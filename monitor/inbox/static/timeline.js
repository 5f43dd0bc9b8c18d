/* Patient timeline charts (uPlot, bundled): days since dose on x; ALT/AST as multiples of ULN on a log
 * axis with 3x/5x/20x lines; other analytes in their canonical units; steroid phases shaded; alerts
 * marked; overdue/upcoming samples drawn as dotted lines. */
(function () {
  "use strict";
  var COLORS = ["#0b5cad", "#d9480f", "#2f7d32", "#7b1fa2", "#00838f", "#5d4037"];
  var SEV = { critical: "#b00020", high: "#d9480f", warning: "#a86b00", info: "#3b6ea5" };
  var PHASE = { full: "rgba(123, 31, 162, 0.13)", taper: "rgba(123, 31, 162, 0.06)" };
  var NAMES = { alt: "ALT", ast: "AST", bilirubin_total: "Total bilirubin", bilirubin_direct: "Direct bilirubin",
    platelets: "Platelets", hemoglobin: "Haemoglobin", creatinine: "Creatinine", troponin_i: "Troponin I",
    troponin_i_hs: "hs-Troponin I", temperature: "Temperature", heart_rate: "Heart rate",
    respiratory_rate: "Respiratory rate", spo2: "SpO2", systolic_bp: "Systolic BP" };
  var UNIT = { "10*9/L": "\u00d710\u2079/L", "Cel": "\u00b0C", "mm[Hg]": "mmHg" };
  var el = function (t, a, c) { return window.InboxUtil.el(t, a, c); };

  function unitLabel(u) { return UNIT[u] || u || ""; }

  function merge(seriesList, key) {
    var xs = {};
    seriesList.forEach(function (s) { s.x.forEach(function (x) { xs[x] = true; }); });
    var x = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    var idx = {};
    x.forEach(function (v, i) { idx[v] = i; });
    var ys = seriesList.map(function (s) {
      var y = new Array(x.length).fill(null);
      s.x.forEach(function (xv, i) { y[idx[xv]] = s[key][i]; });
      return y;
    });
    return [x].concat(ys);
  }

  function overlay(tl, opts) {
    return {
      drawClear: [function (u) {
        var ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
        ctx.save();
        tl.steroid_phases.forEach(function (p) {
          var x0 = u.valToPos(p.from, "x", true), x1 = u.valToPos(p.to == null ? tl.today : p.to, "x", true);
          ctx.fillStyle = PHASE[p.phase] || PHASE.full;
          ctx.fillRect(Math.min(x0, x1), top, Math.abs(x1 - x0), h);
        });
        ctx.restore();
      }],
      draw: [function (u) {
        var ctx = u.ctx, b = u.bbox, dpr = window.devicePixelRatio || 1;
        ctx.save();
        ctx.font = (11 * dpr) + "px system-ui, sans-serif";
        (opts.lines || []).forEach(function (v) {
          var y = u.valToPos(v, "y", true);
          if (y < b.top || y > b.top + b.height) return;
          ctx.strokeStyle = v >= 20 ? SEV.critical : v >= 5 ? SEV.high : SEV.warning;
          ctx.setLineDash([6 * dpr, 4 * dpr]); ctx.lineWidth = 1.5 * dpr;
          ctx.beginPath(); ctx.moveTo(b.left, y); ctx.lineTo(b.left + b.width, y); ctx.stroke();
          ctx.fillStyle = ctx.strokeStyle; ctx.fillText(v + "\u00d7 ULN", b.left + 4 * dpr, y - 3 * dpr);
        });
        ctx.setLineDash([]);
        tl.alerts.forEach(function (a) {
          var x = u.valToPos(a.day, "x", true);
          if (x < b.left || x > b.left + b.width) return;
          ctx.strokeStyle = SEV[a.severity] || SEV.critical; ctx.fillStyle = ctx.strokeStyle; ctx.lineWidth = 1 * dpr;
          ctx.beginPath(); ctx.moveTo(x, b.top); ctx.lineTo(x, b.top + b.height); ctx.stroke();
          ctx.beginPath(); ctx.moveTo(x - 5 * dpr, b.top); ctx.lineTo(x + 5 * dpr, b.top); ctx.lineTo(x, b.top + 8 * dpr);
          ctx.closePath(); ctx.fill();
        });
        if (opts.schedule) {
          ctx.setLineDash([2 * dpr, 3 * dpr]);
          tl.upcoming.forEach(function (s) {
            if (opts.schedule !== true && s.analytes.filter(function (a) { return opts.schedule.indexOf(a) >= 0; }).length === 0) return;
            var x = u.valToPos(s.due_day, "x", true);
            if (x < b.left || x > b.left + b.width) return;
            ctx.strokeStyle = s.overdue ? SEV.critical : "#56606b";
            ctx.beginPath(); ctx.moveTo(x, b.top); ctx.lineTo(x, b.top + b.height); ctx.stroke();
            ctx.fillStyle = ctx.strokeStyle;
            ctx.fillText(s.group + (s.overdue ? " overdue" : " due"), x + 3 * dpr, b.top + b.height - 4 * dpr);
          });
          ctx.setLineDash([]);
        }
        var tx = u.valToPos(tl.today, "x", true);
        if (tx >= b.left && tx <= b.left + b.width) {
          ctx.strokeStyle = "#1b1f24"; ctx.lineWidth = 1 * dpr;
          ctx.beginPath(); ctx.moveTo(tx, b.top); ctx.lineTo(tx, b.top + b.height); ctx.stroke();
          ctx.fillStyle = "#1b1f24"; ctx.fillText("today", tx + 3 * dpr, b.top + 12 * dpr);
        }
        ctx.restore();
      }]
    };
  }

  function xRange(tl, x) {
    var lo = Math.min(0, x.length ? x[0] : 0) - 1;
    var hi = Math.max(tl.today, x.length ? x[x.length - 1] : 0);
    tl.upcoming.forEach(function (s) { hi = Math.max(hi, s.due_day); });
    return [lo, hi + 1];
  }

  function valuesTable(names, data, unit) {
    var det = el("details", {}, [el("summary", { text: "Show values" })]);
    var head = el("tr", {}, [el("th", { scope: "col", text: "Day" })].concat(names.map(function (n) {
      return el("th", { scope: "col", text: n + (unit ? " (" + unit + ")" : "") }); })));
    var body = el("tbody");
    for (var i = 0; i < data[0].length; i++) {
      body.appendChild(el("tr", {}, [el("td", { text: data[0][i].toFixed(1) })].concat(names.map(function (n, j) {
        var v = data[j + 1][i];
        return el("td", { "class": "num", text: v == null ? "" : String(v) });
      }))));
    }
    det.appendChild(el("div", { "class": "table-wrap" }, [el("table", {}, [el("thead", {}, [head]), body])]));
    return det;
  }

  function chart(container, tl, spec) {
    // spec: {title, series:[series objects], key:"y"|"xuln", log, lines, unit, schedule, wide}
    var card = el("section", { "class": "chart-card" + (spec.wide ? " wide" : ""), "data-panel": spec.id });
    var hid = "chart-h-" + spec.id;
    card.appendChild(el("h3", { id: hid, text: spec.title }));
    container.appendChild(card);
    if (!spec.series.length) {
      card.appendChild(el("p", { "class": "hint", text: "No results yet." }));
      return null;
    }
    var data = merge(spec.series, spec.key);
    var names = spec.series.map(function (s) { return NAMES[s.analyte] || s.analyte; });
    var box = el("div", { "class": "chart-box", role: "img", "aria-labelledby": hid });
    var peak = spec.series.map(function (s, i) {
      var m = null, d = null;
      s[spec.key].forEach(function (v, j) { if (v != null && (m === null || v > m)) { m = v; d = s.x[j]; } });
      return names[i] + " peak " + m + (spec.log ? "\u00d7 ULN" : " " + unitLabel(spec.unit)) + " on day " + (d == null ? "?" : d.toFixed(0));
    }).join("; ");
    box.setAttribute("aria-label", spec.title + ": " + peak);
    card.appendChild(box);
    var width = Math.max(280, (container.clientWidth || 700) - (spec.wide ? 24 : 24));
    if (document.body.id === "page-patient" && !spec.wide && window.innerWidth >= 1100) width = Math.max(280, width / 2 - 12);
    var yScale = spec.log ? {
      distr: 3, log: 10,
      range: function (u, min, max) { return [Math.min(0.3, (min || 0.3) * 0.8), Math.max(30, (max || 1) * 1.5)]; }
    } : { auto: true };
    var opts = {
      width: width, height: spec.height || (spec.log ? 300 : 200),
      scales: { x: { time: false, range: function () { return xRange(tl, data[0]); } }, y: yScale },
      axes: [
        { label: "Days since dose", stroke: "#1b1f24", grid: { stroke: "#e3e8ed" } },
        { label: spec.log ? "\u00d7 ULN" : unitLabel(spec.unit), stroke: "#1b1f24", grid: { stroke: "#e3e8ed" }, size: 60 }
      ],
      series: [{ label: "Day", value: function (u, v) { return v == null ? "" : v.toFixed(1); } }].concat(
        spec.series.map(function (s, i) {
          return { label: names[i] + (spec.log ? " (\u00d7ULN)" : ""), stroke: COLORS[i % COLORS.length], width: 2,
                   spanGaps: true, points: { show: s.x.length <= 80, size: 6 } };
        })),
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      hooks: overlay(tl, { lines: spec.lines, schedule: spec.schedule })
    };
    var u = new window.uPlot(opts, data, box);
    if (spec.note) card.appendChild(el("p", { "class": "legend-note", text: spec.note }));
    card.appendChild(valuesTable(names, data, spec.log ? "\u00d7 ULN" : unitLabel(spec.unit)));
    return u;
  }

  function render(container, tl, which) {
    container.textContent = "";
    var plots = [];
    var panels = tl.panels.filter(function (p) { return which === "all" || which.split(",").indexOf(p.id) >= 0; });
    var phaseNote = tl.steroid_phases.length ? "Shaded: prednisolone full dose (darker) and taper (lighter). " : "No steroid course recorded. ";
    var alertNote = tl.alerts.length ? "Triangles: alerts opened. " : "";
    panels.forEach(function (p) {
      var series = p.analytes.filter(function (a) { return tl.series[a]; }).map(function (a) { return tl.series[a]; });
      if (p.id === "vitals") {
        series.forEach(function (s) {
          plots.push(chart(container, tl, { id: "vital-" + s.analyte, title: NAMES[s.analyte] || s.analyte, series: [s],
            key: "y", unit: s.unit, height: 160 }));
        });
        if (!series.length) chart(container, tl, { id: "vitals", title: p.title, series: [], key: "y" });
        return;
      }
      var assumed = series.filter(function (s) { return s.uln_assumed; }).map(function (s) { return NAMES[s.analyte]; });
      plots.push(chart(container, tl, {
        id: p.id, title: p.title, series: series, key: p.uln ? "xuln" : "y", log: !!p.log, lines: p.lines,
        unit: series.length ? series[0].unit : "", schedule: p.id === "liver" ? p.analytes : null, wide: p.id === "liver",
        note: p.id === "liver" ? phaseNote + alertNote + "Dashed: 3\u00d7, 5\u00d7 and 20\u00d7 ULN. Dotted: samples due." +
          (assumed.length ? " ULN assumed (no reference range received) for " + assumed.join(", ") + "." : "") : null
      }));
    });
    return plots.filter(Boolean);
  }

  function renderSchedule(tl) {
    var box = document.getElementById("schedule");
    if (!box) return;
    box.textContent = "";
    if (!tl.upcoming.length && !tl.overdue.length) { box.appendChild(el("p", { "class": "hint", text: "No scheduled samples." })); return; }
    var body = el("tbody");
    tl.upcoming.forEach(function (s) {
      body.appendChild(el("tr", {}, [el("th", { scope: "row", text: s.group }), el("td", { text: s.analytes.map(function (a) { return NAMES[a] || a; }).join(", ") }),
        el("td", { text: "day " + s.due_day.toFixed(1) + " (every " + s.every_days + " d)" }),
        el("td", { "class": s.overdue ? "overdue" : "", text: s.overdue ? "OVERDUE" : "upcoming" })]));
    });
    tl.overdue.forEach(function (o) {
      body.appendChild(el("tr", {}, [el("th", { scope: "row", text: "alert" }), el("td", { text: o.analyte }),
        el("td", { text: o.last_day == null ? "never sampled" : "last sample day " + o.last_day.toFixed(1) }),
        el("td", { "class": "overdue" }, [el("a", { href: "/alerts/" + encodeURIComponent(o.alert_id), text: "overdue alert" })])]));
    });
    box.appendChild(el("table", { "class": "sched-table" }, [el("thead", {}, [el("tr", {}, [
      el("th", { scope: "col", text: "Group" }), el("th", { scope: "col", text: "Analytes" }),
      el("th", { scope: "col", text: "Due" }), el("th", { scope: "col", text: "State" })])]), body]));
    var list = document.getElementById("patient-alerts");
    if (list) {
      list.textContent = "";
      tl.alerts.slice().reverse().forEach(function (a) {
        list.appendChild(el("li", {}, [el("span", { "class": "badge sev-" + a.severity, text: a.severity }), " ",
          el("a", { href: "/alerts/" + encodeURIComponent(a.alert_id), text: a.what }),
          " \u00b7 day " + a.day.toFixed(1) + " \u00b7 " + a.status]));
      });
      if (!tl.alerts.length) list.appendChild(el("li", { text: "No alerts." }));
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var container = document.getElementById("charts");
    if (!container || !window.uPlot) return;
    var ref = container.getAttribute("data-patient-ref");
    var which = container.getAttribute("data-panels") || "all";
    window.InboxUtil.getJSON("/api/patients/" + encodeURIComponent(ref) + "/timeline").then(function (tl) {
      var plots = render(container, tl, which);
      renderSchedule(tl);
      container.setAttribute("data-rendered", String(plots.length));
      var t = null;
      window.addEventListener("resize", function () {
        if (t) clearTimeout(t);
        t = setTimeout(function () { plots.forEach(function (p) { p.destroy(); }); plots = render(container, tl, which); }, 200);
      });
    }).catch(function (e) {
      container.textContent = "";
      container.appendChild(el("p", { "class": "error", text: "Could not load the timeline: " + e.message }));
    });
  });
})();
