/* Nurse inbox: live list (server-sent events), action forms. No framework, no external requests. */
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var CSRF = meta ? meta.getAttribute("content") : "";
  var SEV_LABEL = { critical: "Critical", high: "High", warning: "Warning", info: "Info" };
  var SEV_RANK = { info: 1, warning: 2, high: 3, critical: 4 };

  function el(tag, attrs, children) {
    var n = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === "class") n.className = attrs[k];
      else if (k === "text") n.textContent = attrs[k];
      else n.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) n.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return n;
  }

  function age(iso) {
    var s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  // background: a refresh the page makes by itself (after a live event); the server does not
  // count it as user activity, so an unattended screen still reaches the idle timeout
  function getJSON(url, background) {
    var headers = { Accept: "application/json" };
    if (background) headers["X-Inbox-Background"] = "1";
    return fetch(url, { credentials: "same-origin", headers: headers }).then(function (r) {
      if (r.status === 401) { window.location.assign("/login"); throw new Error("signed out"); }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    });
  }
  window.InboxUtil = { getJSON: getJSON, el: el, age: age };

  function connectStream(onMessage, stateEl) {
    if (!window.EventSource) return;
    var es = new EventSource("/api/stream");
    es.addEventListener("hello", function () {
      if (stateEl) { stateEl.textContent = "Live"; stateEl.classList.add("on"); }
      onMessage({ type: "resync" });
    });
    ["alert", "pending", "resync"].forEach(function (t) {
      es.addEventListener(t, function (ev) { try { onMessage(JSON.parse(ev.data)); } catch (e) { /* ignore */ } });
    });
    es.addEventListener("logout", function () { es.close(); window.location.assign("/login"); });
    es.onerror = function () {
      if (stateEl) { stateEl.textContent = "Reconnecting..."; stateEl.classList.remove("on"); }
    };
    window.addEventListener("pagehide", function () { es.close(); });
    return es;
  }

  /* ------------------------------------------------------------------ notifications (opt-in, per user) */
  /* A new critical or high alert on the user's wards (the server scopes /api/alerts and the live
     stream to them) raises a browser notification and a short WebAudio tone, if the user opted in.
     The preference lives in localStorage keyed by the user name (a shared ward workstation keeps
     one per user); permission is asked only when the user ticks the opt-in box. The notification
     names the rule, severity and ward/bed, never the patient's name, MRN or date of birth
     (lock screens). The page title carries the open count: "(3) Inbox". */
  function makeNotifier(user, box, stateEl) {
    var KEY = "sma-inbox.notify:" + user;
    var baseTitle = document.title;
    var seen = null, audio = null;

    function on() { try { return window.localStorage.getItem(KEY) === "on"; } catch (e) { return false; } }
    function save(v) {
      try { if (v) window.localStorage.setItem(KEY, "on"); else window.localStorage.removeItem(KEY); } catch (e) { /* private mode */ }
    }
    function permission() { return window.Notification ? window.Notification.permission : "unsupported"; }
    function showState() {
      if (!stateEl) return;
      var p = permission();
      stateEl.textContent = !on() ? "" : p === "granted" ? "On." : p === "denied"
        ? "Sound only: notifications are blocked for this site in the browser settings."
        : p === "unsupported" ? "Sound only: this browser has no notifications." : "Waiting for the browser's permission...";
    }
    function tone(critical) {
      var AC = window.AudioContext || window.webkitAudioContext;
      if (!AC) return;
      try {
        if (!audio) audio = new AC();
        if (audio.state === "suspended" && audio.resume) audio.resume();
        var t0 = audio.currentTime + 0.02;
        for (var i = 0; i < (critical ? 3 : 2); i++) {  // critical: three pips, high: two
          var osc = audio.createOscillator(), gain = audio.createGain(), t = t0 + i * 0.25;
          osc.type = "sine";
          osc.frequency.value = i % 2 ? 660 : 880;
          gain.gain.setValueAtTime(0.0001, t);
          gain.gain.exponentialRampToValueAtTime(0.25, t + 0.02);
          gain.gain.exponentialRampToValueAtTime(0.0001, t + 0.2);
          osc.connect(gain);
          gain.connect(audio.destination);
          osc.start(t);
          osc.stop(t + 0.22);
        }
      } catch (e) { /* no sound device */ }
    }
    function text(a) {
      var bed = a.patient && a.patient.bed ? ", bed " + a.patient.bed : "";
      return { title: (SEV_LABEL[a.severity] || a.severity) + " alert \u00b7 " + (a.ward || "no ward") + bed,
               body: a.rule_id + " \u00b7 " + a.pseudonym + " \u00b7 open the inbox to see the patient" };
    }
    function announce(a) {
      tone(a.severity === "critical");
      if (permission() !== "granted") return;
      var t = text(a);
      try {
        var n = new window.Notification(t.title, { body: t.body, tag: a.alert_id, requireInteraction: a.severity === "critical" });
        n.onclick = function () { window.focus(); window.location.assign("/alerts/" + encodeURIComponent(a.alert_id)); };
      } catch (e) { /* some platforms allow notifications from a service worker only */ }
    }
    if (box) {
      box.checked = on();
      box.addEventListener("change", function () {
        save(box.checked);
        if (box.checked) {
          // the explicit opt-in: the only place permission is asked; the click also unlocks audio
          tone(false);
          if (window.Notification && window.Notification.requestPermission && permission() !== "denied") {
            try {
              var p = window.Notification.requestPermission();
              if (p && p.then) p.then(showState, showState);
            } catch (e) { /* old callback-only API */ }
          }
        }
        showState();
      });
    }
    showState();
    return {
      /* data: the user's open alerts, unfiltered (all of their wards) */
      watch: function (data) {
        document.title = data.count > 0 ? "(" + data.count + ") " + baseTitle : baseTitle;
        var next = {};
        data.alerts.forEach(function (a) {
          next[a.alert_id] = a.severity;
          var before = seen ? (SEV_RANK[seen[a.alert_id]] || 0) : null;
          // new (or newly raised to) critical/high and firing; alerts open at page load do not ring
          if (before !== null && on() && a.status === "firing" && SEV_RANK[a.severity] >= SEV_RANK.high &&
              before < SEV_RANK[a.severity]) announce(a);
        });
        seen = next;
      }
    };
  }

  /* ------------------------------------------------------------------ inbox list */
  function initInbox() {
    var rows = document.getElementById("alert-rows");
    var count = document.getElementById("alert-count");
    var empty = document.getElementById("no-alerts");
    var fWard = document.getElementById("f-ward");
    var fTeam = document.getElementById("f-team");
    var live = document.getElementById("live-state");
    var known = null, fresh = {}, last = null, timer = null;
    var notifier = makeNotifier(document.body.getAttribute("data-user") || "", document.getElementById("notify-opt"),
                                document.getElementById("notify-state"));

    function fillSelect(sel, values) {
      var cur = sel.value;
      while (sel.options.length > 1) sel.remove(1);
      values.forEach(function (v) { sel.appendChild(el("option", { value: v, text: v })); });
      if (cur && values.indexOf(cur) < 0) sel.appendChild(el("option", { value: cur, text: cur }));
      sel.value = cur;
    }

    function render(data) {
      last = data;
      fillSelect(fWard, data.facets.wards);
      fillSelect(fTeam, data.facets.teams);
      var frag = document.createDocumentFragment();
      function patientCell(p) {
        if (!p || !p.registered) {
          return [el("span", { "class": "patient-name unregistered", text: "Unregistered" }), el("br"),
                  el("span", { "class": "patient-ids", text: "id " + (p ? p.patient_id : "?") })];
        }
        return [el("span", { "class": "patient-name", text: p.display_name }), el("br"),
                el("span", { "class": "patient-ids", text: "MRN " + p.mrn + " \u00b7 born " + p.birth_date })];
      }
      data.alerts.forEach(function (a) {
        var href = "/alerts/" + encodeURIComponent(a.alert_id);
        var status = a.pending && a.pending.length ? a.status + " (" + a.pending[a.pending.length - 1].action + " sent)" : a.status;
        var tr = el("tr", { "class": "sev-" + a.severity + (fresh[a.alert_id] ? " fresh" : ""), "data-alert-id": a.alert_id }, [
          el("td", { "class": "sev" }, [el("span", { "class": "badge sev-" + a.severity, text: SEV_LABEL[a.severity] || a.severity })]),
          el("td", { "class": "patient-cell" }, patientCell(a.patient)),
          el("td", { "class": "what-cell" }, [el("a", { "class": "what", href: href, text: a.what }),
                                               el("span", { "class": "rule", text: a.rule_id + " \u00b7 " + a.pseudonym })]),
          el("td", { "class": "ward-cell" }, [(a.ward || "\u2013") + " / " + (a.care_team || "\u2013"),
            a.dose_ward ? el("span", { "class": "dose-ward", text: " (dose ward " + a.dose_ward + ")" }) : null]),
          el("td", { "class": "age", "data-opened": a.opened_at, title: a.opened_at, text: age(a.opened_at) }),
          el("td", {}, [el("span", { "class": "status status-" + a.status, text: status })])
        ]);
        tr.addEventListener("click", function (ev) { if (ev.target.tagName !== "A") window.location.assign(href); });
        frag.appendChild(tr);
      });
      rows.textContent = "";
      rows.appendChild(frag);
      empty.classList.toggle("hidden", data.alerts.length > 0);
      count.textContent = data.count + (data.count === 1 ? " open alert" : " open alerts");
      fresh = {};
    }

    function load(background) {
      var q = [];
      if (fWard.value) q.push("ward=" + encodeURIComponent(fWard.value));
      if (fTeam.value) q.push("team=" + encodeURIComponent(fTeam.value));
      return getJSON("/api/alerts" + (q.length ? "?" + q.join("&") : ""), background === true).then(function (data) {
        if (known !== null) data.alerts.forEach(function (a) { if (!known[a.alert_id]) fresh[a.alert_id] = true; });
        known = {};
        data.alerts.forEach(function (a) { known[a.alert_id + ""] = a.version; });
        render(data);
        if (!fWard.value && !fTeam.value) notifier.watch(data);  // the same list: no second request
        else getJSON("/api/alerts", true).then(notifier.watch).catch(function () { /* next event retries */ });
      }).catch(function () { /* next event retries */ });
    }
    function soon() { if (timer) clearTimeout(timer); timer = setTimeout(function () { load(true); }, 150); }

    fWard.addEventListener("change", load);
    fTeam.addEventListener("change", load);
    document.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); load(); });
    load();
    connectStream(function (msg) { if (msg.type === "alert" && msg.alert && known && !known[msg.alert.alert_id]) fresh[msg.alert.alert_id] = true; soon(); }, live);
    setInterval(function () {
      Array.prototype.forEach.call(document.querySelectorAll("td.age"), function (td) { td.textContent = age(td.getAttribute("data-opened")); });
    }, 30000);
  }

  /* ------------------------------------------------------------------ alert detail */
  function initAlert() {
    var body = document.body;
    var alertId = body.getAttribute("data-alert-id");
    var version = parseInt(body.getAttribute("data-version"), 10);
    var shownAtSubmit = version;
    var statusBox = document.getElementById("action-status");
    var statusEl = document.getElementById("alert-status");

    function say(text, bad) {
      statusBox.textContent = "";
      statusBox.appendChild(el("p", { "class": "notice" + (bad ? " bad" : ""), text: text }));
    }

    Array.prototype.forEach.call(document.querySelectorAll("form.action-form"), function (form) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var kind = form.getAttribute("data-action");
        var payload = { action: kind };
        var reason = form.querySelector('[name="reason"]');
        var until = form.querySelector('[name="until"]');
        if (reason && reason.value.trim()) payload.reason = reason.value.trim();
        if (until && until.value) payload.until = until.value.length === 16 ? until.value + ":00" : until.value;  // site time: the server applies INBOX_TIMEZONE
        var btn = form.querySelector("button");
        btn.disabled = true;
        shownAtSubmit = version;
        fetch(form.getAttribute("action"), {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF, Accept: "application/json" },
          body: JSON.stringify(payload)
        }).then(function (r) {
          return r.json().catch(function () { return {}; }).then(function (j) { return { r: r, j: j }; });
        }).then(function (res) {
          btn.disabled = false;
          if (res.r.status === 401) { window.location.assign("/login"); return; }
          if (!res.r.ok) { say((res.j && res.j.error) || ("Refused (HTTP " + res.r.status + ")"), true); return; }
          say(btn.textContent + " sent. Waiting for the monitor to record it.");
          if (reason) reason.value = "";
          // the worker can answer before this POST does: if a newer version is already
          // shown, it is the truth and must not be marked pending again
          if (kind === "acknowledge" && version === shownAtSubmit) {
            statusEl.textContent = statusEl.textContent + " (acknowledgement sent)";
            statusEl.className = "status status-pending";
            form.classList.add("hidden");
          }
        }).catch(function () { btn.disabled = false; say("Could not reach the server; try again.", true); });
      });
    });

    connectStream(function (msg) {
      if (msg.type === "alert" && msg.alert && msg.alert.alert_id === alertId && msg.alert.version > version) {
        version = msg.alert.version;
        statusEl.textContent = msg.alert.status;
        statusEl.className = "status status-" + msg.alert.status;
        var a = el("a", { href: window.location.pathname, text: "Reload to see the full history" });
        statusBox.textContent = "";
        statusBox.appendChild(el("p", { "class": "notice" }, ["Alert updated to version " + version + " (" + msg.alert.status + "). ", a]));
      }
    }, null);
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.body.id === "page-inbox") initInbox();
    if (document.body.id === "page-alert") initAlert();
  });
})();
