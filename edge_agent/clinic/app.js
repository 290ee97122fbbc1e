// The clinician's page: every value shown comes from the box's API, called with the bearer token
// the clinician typed (kept in this tab's sessionStorage only). Values are set as text, never as markup.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { classes: [], positive: null, study: null };
  const tokenBox = $("token");
  tokenBox.value = sessionStorage.getItem("fedscan-token") || "";

  function headers(extra) {
    return Object.assign({ Authorization: "Bearer " + tokenBox.value.trim() }, extra || {});
  }

  async function api(path, options) {
    const r = await fetch(path, Object.assign({ cache: "no-store" }, options || {}));
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const d = (body && body.detail) || {};
      const why = typeof d === "object" ? (d.reason ? d.reason + ": " : "") + (d.message || r.statusText) : String(d);
      const err = new Error(r.status + " " + why);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  function setStatus(text, kind) {
    $("status").textContent = text;
    $("result").dataset.state = kind;
  }

  function percent(x) { return (100 * x).toFixed(1) + " %"; }

  async function loadModel() {
    try {
      const m = await api("/v1/model", { headers: headers() });
      state.classes = m.classes;
      state.positive = m.classes[m.classes.length - 1];
      $("model").textContent = "model: " + m.version + (m.calibrated ? " (calibrated)" : "");
      $("positive-name").textContent = state.positive;
      const sel = $("correct");
      sel.textContent = "";
      for (const c of m.classes) {
        const o = document.createElement("option");
        o.value = c; o.textContent = c;
        sel.appendChild(o);
      }
      document.body.dataset.model = m.version;
    } catch (e) {
      $("model").textContent = "model: " + (e.status === 401 ? "enter a valid API token" : e.message);
    }
  }

  async function loadStudies() {
    let rows = [];
    try { rows = await api("/v1/studies?limit=10", { headers: headers() }); } catch (e) { return; }
    const body = $("studies").tBodies[0];
    body.textContent = "";
    for (const s of rows) {
      const tr = document.createElement("tr");
      tr.dataset.study = s.study_id;
      const cells = [new Date(s.created_at * 1000).toLocaleTimeString(), s.study_id.slice(0, 8), s.label || "–",
        s.confidence == null ? "–" : percent(s.confidence), s.model_version || "–", s.finding || "–"];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.className = ["time", "study", "label", "reliability", "model", "finding"][i];
        td.textContent = text;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    }
    document.body.dataset.studies = String(rows.length);
  }

  async function diagnose(file) {
    if (!file) return;
    sessionStorage.setItem("fedscan-token", tokenBox.value.trim());
    const preview = $("preview");
    if (/^image\/(png|jpeg)$/.test(file.type)) { preview.src = URL.createObjectURL(file); preview.hidden = false; }
    else { preview.hidden = true; }
    $("answer").hidden = true; $("finding").hidden = true; $("finding-status").textContent = "";
    setStatus("Diagnosing " + file.name + " …", "busy");
    const t0 = performance.now();
    try {
      const d = await api("/v1/diagnose", {
        method: "POST", body: file,
        headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
      });
      const rtt = performance.now() - t0;
      state.study = d.study_id;
      $("label").textContent = d.label;
      $("label").className = d.label;
      const pos = state.positive || Object.keys(d.probabilities).slice(-1)[0];
      $("probability").textContent = percent(d.probabilities[pos]);
      $("reliability").textContent = d.reliability_percent.toFixed(1) + " %" + (d.calibrated ? "" : " (uncalibrated)");
      $("version").textContent = d.model_version;
      $("time").textContent = d.timings.total_ms.toFixed(0) + " ms on the box, " + rtt.toFixed(0) + " ms here";
      $("correct").value = d.label;
      $("answer").hidden = false; $("finding").hidden = false;
      setStatus(file.name + ": done", "done");
    } catch (e) {
      setStatus(file.name + ": " + (e.status === 401 ? "enter a valid API token" : e.message), "error");
    }
    loadStudies();
  }

  async function finding(label) {
    if (!state.study) return;
    try {
      const s = await api("/v1/studies/" + encodeURIComponent(state.study) + "/finding", {
        method: "POST", body: JSON.stringify({ label: label }),
        headers: headers({ "Content-Type": "application/json" }),
      });
      $("finding-status").textContent = "recorded: " + s.finding + " (a training label on this box)";
      $("result").dataset.finding = s.finding;
    } catch (e) {
      $("finding-status").textContent = e.message;
    }
    loadStudies();
  }

  $("file").addEventListener("change", (ev) => diagnose(ev.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files.length) diagnose(ev.dataTransfer.files[0]);
  });
  $("confirm").addEventListener("click", () => finding($("label").textContent));
  $("save-correction").addEventListener("click", () => finding($("correct").value));
  tokenBox.addEventListener("change", () => {
    sessionStorage.setItem("fedscan-token", tokenBox.value.trim());
    loadModel(); loadStudies();
  });
  loadModel().then(loadStudies).then(() => { document.body.dataset.loaded = "1"; });
})();
