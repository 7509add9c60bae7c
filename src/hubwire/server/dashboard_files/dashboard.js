"use strict";
// hubwire's cluster dashboard: one SignalR connection (the official browser client served next to
// this file) to the dashboard's own hub, which pushes a "snapshot" every second. Everything in a
// snapshot comes from the instances over Redis, so it is written into the page as text only
// (textContent, attributes), never as HTML.
(() => {
  const WINDOW_S = 120;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const rate = (v) => (v === null || v === undefined ? "-" : v >= 100 ? Math.round(v).toString() : (Math.round(v * 10) / 10).toString());
  const count = (v) => (v === null || v === undefined ? "-" : Number(v).toLocaleString("en-US"));
  const bytes = (v) => {
    if (!v) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${Math.round(v * 10) / 10} ${units[i]}`;
  };
  const uptime = (started, now) => {
    if (!started) return "-";
    const s = Math.max(0, Math.floor(now - started));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600)}h`;
  };

  function setStatus(state) {
    const status = $("status");
    status.className = `status ${state}`;
    status.textContent = state;
    document.body.dataset.status = state;
  }

  function tiles(snapshot) {
    const t = snapshot.totals;
    const redis = snapshot.backplane !== "in-memory";
    const answered = t.answered === t.instances ? `${t.instances}` : `${t.answered} of ${t.instances}`;
    $("t-instances").textContent = answered;
    $("t-connections").textContent = count(t.connections);
    $("t-deliveries").textContent = rate(t.deliveries_per_s);
    $("t-published").textContent = redis ? rate(t.published_per_s) : "-";
    $("t-received").textContent = redis ? rate(t.received_per_s) : "-";
    $("t-buffered").textContent = redis ? `${count(t.buffered)} (${bytes(t.buffered_bytes)})` : "-";
    // a message or two waits in the buffer at any moment under load: alarming only while Redis is away
    const away = snapshot.instances.some((r) => r.backplane && r.backplane.state !== "connected");
    $("t-buffered").classList.toggle("alert", away && t.buffered > 0);
    $("t-dropped").textContent = redis ? count(t.dropped) : "-";
    $("t-dropped").classList.toggle("alert", t.dropped > 0);
  }

  function instanceRow(row, snapshot) {
    const tr = el("tr", { "data-instance": row.name, "data-health": row.health });
    if (row.name === snapshot.served_by) tr.className = "self";
    const health = el("td");
    const badge = el("span", { class: "health" });
    badge.append(el("span", { class: `dot ${row.health.replace(" ", "-")}` }), document.createTextNode(row.health));
    health.append(badge);
    tr.append(health, el("td", { class: "name" }, row.name));
    if (!row.answered) {
      tr.append(el("td", { colspan: "11" }, "no answer in time (lease still held: dead, or too busy to answer)"));
      return tr;
    }
    const bp = row.backplane;
    tr.dataset.total = String(row.total);
    tr.append(
      el("td", {}, row.address || "-"),
      el("td", {}, row.version),
      el("td", {}, uptime(row.started, snapshot.at)),
      el("td", {}, bp ? bp.state : "in-memory"),
      el("td", { class: "n", "data-field": "total" }, count(row.total)),
      el("td", { class: "n" }, rate(row.deliveries_per_s)),
      el("td", { class: "n" }, bp ? rate(row.published_per_s) : "-"),
      el("td", { class: "n" }, bp ? rate(row.received_per_s) : "-"),
      el("td", { class: `n${bp && bp.buffered && bp.state !== "connected" ? " alert" : ""}` }, bp ? `${count(bp.buffered)} (${bytes(bp.buffered_bytes)})` : "-"),
      el("td", { class: "n" }, bp ? count(bp.subscriptions) : "-"),
      el("td", { class: `n${bp && bp.dropped ? " alert" : ""}` }, bp ? count(bp.dropped) : "-"),
    );
    return tr;
  }

  function perHub(snapshot) {
    const transports = [...new Set(snapshot.totals.per_hub.map((c) => c[1]))].sort();
    const head = $("per-hub").tHead.rows[0];
    head.replaceChildren(el("th", {}, "instance"), el("th", {}, "hub"), ...transports.map((t) => el("th", { class: "n" }, t)), el("th", { class: "n" }, "total"));
    const body = [];
    for (const row of snapshot.instances) {
      if (!row.answered) continue;
      const hubs = new Map();
      for (const c of row.connections) {
        if (!hubs.has(c.hub)) hubs.set(c.hub, new Map());
        hubs.get(c.hub).set(c.transport, c.connections);
      }
      for (const [hub, byTransport] of [...hubs.entries()].sort()) {
        const tr = el("tr", { "data-instance": row.name, "data-hub": hub });
        tr.append(el("td", { class: "name" }, row.name), el("td", {}, hub));
        let sum = 0;
        for (const t of transports) {
          const n = byTransport.get(t) || 0;
          sum += n;
          tr.append(el("td", { class: "n", "data-transport": t }, count(n)));
        }
        tr.append(el("td", { class: "n" }, count(sum)));
        body.push(tr);
      }
    }
    if (body.length === 0) {
      const tr = el("tr");
      tr.append(el("td", { colspan: String(transports.length + 3) }, "no hub connections"));
      body.push(tr);
    }
    $("per-hub").tBodies[0].replaceChildren(...body);
  }

  function niceMax(v) {
    if (v <= 1) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function chart(snapshot) {
    const svg = $("chart");
    const W = Math.max(320, Math.round(svg.getBoundingClientRect().width) || 720);
    const H = 180, left = 44, right = 8, top = 8, bottom = 20;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const points = snapshot.history;
    const end = points.length ? points[points.length - 1][0] : snapshot.at;
    const start = end - WINDOW_S;
    const shown = points.filter((p) => p[0] >= start);
    const peaks = [1, 2, 3].map((i) => Math.max(0, ...shown.map((p) => p[i] || 0)));
    const max = niceMax(Math.max(...peaks));
    const x = (t) => left + ((t - start) / WINDOW_S) * (W - left - right);
    const y = (v) => top + (1 - v / max) * (H - top - bottom);
    const nodes = [];
    for (const f of [0, 0.5, 1]) {
      const v = max * f;
      nodes.push(svgNode("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
      nodes.push(svgNode("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, rate(v)));
    }
    for (const [label, at] of [[`-${WINDOW_S}s`, start], ["-60s", end - 60], ["now", end]]) {
      nodes.push(svgNode("text", { class: "axis", x: x(at), y: H - 4, "text-anchor": at === end ? "end" : "start" }, label));
    }
    ["deliveries", "published", "received"].forEach((series, i) => {
      const coords = shown.filter((p) => p[i + 1] !== null).map((p) => `${x(p[0]).toFixed(1)},${y(p[i + 1] || 0).toFixed(1)}`);
      nodes.push(svgNode("polyline", { class: series, points: coords.join(" "), "data-series": series }));
      svg.dataset[`peak${series[0].toUpperCase()}${series.slice(1)}`] = String(peaks[i]);
    });
    svg.dataset.points = String(shown.length);
    svg.replaceChildren(...nodes);
  }

  function svgNode(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  let snapshots = 0;
  function render(snapshot) {
    snapshots += 1;
    document.body.dataset.snapshots = String(snapshots);
    document.body.dataset.instances = String(snapshot.instances.length);
    const error = $("error");
    error.hidden = !snapshot.error;
    error.textContent = snapshot.error || "";
    const when = new Date(snapshot.at * 1000).toLocaleTimeString();
    $("meta").textContent = `${snapshot.backplane} backplane · served by ${snapshot.served_by} · ${snapshot.viewers} viewer${snapshot.viewers === 1 ? "" : "s"} here · ${when}`;
    tiles(snapshot);
    $("instances").tBodies[0].replaceChildren(...snapshot.instances.map((row) => instanceRow(row, snapshot)));
    perHub(snapshot);
    chart(snapshot);
  }

  const connection = new signalR.HubConnectionBuilder()
    .withUrl(document.body.dataset.hub)
    .withAutomaticReconnect({ nextRetryDelayInMilliseconds: (ctx) => Math.min(5000, 500 * (ctx.previousRetryCount + 1)) })
    .configureLogging(signalR.LogLevel.Warning)
    .build();
  connection.on("snapshot", render);
  connection.onreconnecting(() => setStatus("reconnecting"));
  connection.onreconnected(() => setStatus("live"));
  let retry = null;
  const later = () => {
    setStatus("disconnected");
    if (retry === null) retry = setTimeout(() => { retry = null; start(); }, 3000);
  };
  connection.onclose(later);

  async function start() {
    try {
      await connection.start();
      setStatus("live");
    } catch (err) {
      later();
    }
  }
  start();
})();
