// fedscan fleet dashboard: polls the fleet JSON and renders it with plain DOM + SVG (no libraries).
// Every value from the server is written with textContent / setAttribute, never as HTML.
"use strict";
(function () {
  const API = document.querySelector('meta[name="fedscan-api"]').content;
  const REFRESH_MS = parseInt(document.querySelector('meta[name="fedscan-refresh-ms"]').content, 10) || 2000;
  const SVGNS = "http://www.w3.org/2000/svg";
  const SERIES = ["cpu", "mem", "disk", "gpu_util", "gpu_temp"];
  const PAGE = 100;  // agents per page: the server pages and filters, a fleet of thousands stays light
  let selected = null;
  let last = null;
  let offset = 0;
  let timer = null;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function pct(v) { return v === null || v === undefined ? "–" : v.toFixed(1) + "%"; }
  function num(v, unit) { return v === null || v === undefined ? "–" : (Math.round(v * 10) / 10) + (unit || ""); }
  function age(s) {
    if (s === null || s === undefined) return "never";
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  // polyline points for values (0..max) over times t (seconds, <= 0) on a w x h box
  function points(t, values, w, h, max, span) {
    const out = [];
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v === null || v === undefined) continue;
      const x = w + (t[i] / span) * w;
      const y = h - (Math.min(v, max) / max) * h;
      out.push(x.toFixed(1) + "," + y.toFixed(1));
    }
    return out.join(" ");
  }
  function span(t) { return Math.max(10, t.length ? -t[0] : 10); }

  function sparkline(hist) {
    const w = 160, h = 30;
    const s = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "spark" });
    s.appendChild(svg("rect", { x: 0, y: 0, width: w, height: h, fill: "#f8fafc" }));
    for (const key of ["cpu", "mem", "gpu_util"]) {
      const p = points(hist.t, hist[key], w, h, 100, span(hist.t));
      if (p) s.appendChild(svg("polyline", { points: p, class: "line " + key }));
    }
    return s;
  }

  function detailChart(agent) {
    const chart = document.getElementById("detail-chart");
    while (chart.firstChild) chart.removeChild(chart.firstChild);
    document.getElementById("detail-agent").textContent = agent ? agent.agent : "–";
    const W = 720, H = 200, L = 36, B = 18, w = W - L - 6, h = H - B - 6;
    const g = svg("g", { transform: `translate(${L},6)` });
    for (const v of [0, 25, 50, 75, 100]) {
      const y = h - (v / 100) * h;
      g.appendChild(svg("line", { x1: 0, x2: w, y1: y, y2: y, class: "grid" }));
      const label = svg("text", { x: -6, y: y + 3, "text-anchor": "end", class: "axis" });
      label.textContent = String(v);
      g.appendChild(label);
    }
    if (agent) {
      const hist = agent.history, sp = span(hist.t);
      for (const frac of [0, 0.5, 1]) {
        const label = svg("text", { x: frac * w, y: h + 14, "text-anchor": "middle", class: "axis" });
        label.textContent = frac === 1 ? "now" : "-" + Math.round((1 - frac) * sp) + " s";
        g.appendChild(label);
      }
      for (const key of SERIES) {
        const p = points(hist.t, hist[key], w, h, 100, sp);
        if (p) g.appendChild(svg("polyline", { points: p, class: "line " + key, "data-series": key }));
      }
    }
    chart.appendChild(g);
  }

  function kv(target, info) {
    while (target.firstChild) target.removeChild(target.firstChild);
    if (!info) { target.textContent = "none"; return; }
    const done = info.done ?? info.received, total = info.total ?? info.expected;
    if (typeof done === "number" && typeof total === "number" && total > 0) {
      const bar = el("div", { class: "bar", role: "progressbar", "aria-valuenow": done, "aria-valuemax": total });
      const fill = el("div");
      fill.style.width = Math.min(100, (100 * done) / total).toFixed(1) + "%";
      bar.appendChild(fill);
      target.appendChild(el("div", {}, `${done} / ${total}`));
      target.appendChild(bar);
    }
    const dl = el("dl", { class: "kv" });
    for (const [k, v] of Object.entries(info)) {
      dl.appendChild(el("dt", {}, k));
      dl.appendChild(el("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : v));
    }
    target.appendChild(dl);
  }

  function row(a) {
    const tr = el("tr", { "data-agent": a.agent, "data-online": a.online ? "true" : "false" });
    if (a.agent === selected) tr.classList.add("selected");
    tr.appendChild(el("td", { class: "agent" }, a.agent));
    const st = el("td");
    st.appendChild(el("span", { class: "badge " + (a.online ? "online" : "offline") }, a.online ? "online" : "offline"));
    tr.appendChild(st);
    const model = el("td", { class: "model" + (a.drift ? " drift" : "") }, a.model_version || "–");
    if (a.drift) model.title = "desired " + a.desired_version;
    tr.appendChild(model);
    tr.appendChild(el("td", { class: "cpu" }, pct(a.cpu_percent)));
    tr.appendChild(el("td", { class: "mem" }, pct(a.memory_percent)));
    tr.appendChild(el("td", { class: "disk" }, pct(a.disk_percent)));
    const gpu = a.gpu && a.gpu.length ? a.gpu.map((g) => `${num(g.util_percent, "%")} ${num(g.temp_c, "°C")}`).join(", ") : "–";
    tr.appendChild(el("td", { class: "gpu" }, gpu));
    const t = a.training || {};
    const train = t.state ? t.state + (t.step !== undefined ? ` ${t.step}/${t.steps_total ?? "?"}` : "") : "–";
    tr.appendChild(el("td", { class: "training" }, train));
    const inf = a.inference || {};
    const infText = inf.requests !== undefined ? `${inf.requests} req` + (inf.p95_ms !== undefined ? `, p95 ${num(inf.p95_ms, " ms")}` : "") : "–";
    tr.appendChild(el("td", { class: "inference" }, infText));
    tr.appendChild(el("td", { class: "age" }, age(a.age_s)));
    const chart = el("td");
    chart.appendChild(sparkline(a.history));
    tr.appendChild(chart);
    tr.addEventListener("click", () => { selected = a.agent; render(last); });
    return tr;
  }

  function render(data) {
    if (!data) return;
    const agents = data.agents;
    if (!selected || !data.agents.some((a) => a.agent === selected)) selected = data.agents.length ? data.agents[0].agent : null;
    document.getElementById("summary").textContent = `${data.online} / ${data.total} online`;
    const matching = data.matching ?? agents.length;
    document.getElementById("page").textContent =
      matching ? `${data.offset + 1}–${data.offset + agents.length} of ${matching}` : "no agents match";
    document.getElementById("prev").disabled = data.offset <= 0;
    document.getElementById("next").disabled = data.offset + agents.length >= matching;
    kv(document.getElementById("round"), data.round);
    kv(document.getElementById("rollout"), data.rollout);
    const tbody = document.querySelector("#agents tbody");
    const rows = document.createDocumentFragment();
    for (const a of agents) rows.appendChild(row(a));
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    tbody.appendChild(rows);
    detailChart(data.agents.find((a) => a.agent === selected) || null);
    document.getElementById("updated").textContent = "updated " + new Date(data.generated_at * 1000).toLocaleTimeString();
    document.body.setAttribute("data-loaded", "1");
    document.body.setAttribute("data-agents", String(data.total));
  }

  function query() {
    const p = new URLSearchParams({ points: "120", offset: String(offset), limit: String(PAGE),
                                    q: document.getElementById("filter").value.trim(),
                                    state: document.getElementById("state").value });
    return API + "?" + p.toString();
  }

  function schedule(ms) {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  async function poll() {
    const banner = document.getElementById("banner");
    timer = null;
    try {
      const resp = await fetch(query(), { cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      last = await resp.json();
      banner.hidden = true;
      render(last);
    } catch (err) {
      banner.hidden = false;
      banner.textContent = "cannot reach the coordinator (" + err.message + "); showing the last data";
    } finally {
      if (timer === null) schedule(REFRESH_MS);
    }
  }
  function restart() { offset = 0; schedule(150); }
  document.getElementById("filter").addEventListener("input", restart);
  document.getElementById("state").addEventListener("change", restart);
  document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); schedule(0); });
  document.getElementById("next").addEventListener("click", () => { offset += PAGE; schedule(0); });
  poll();
})();
