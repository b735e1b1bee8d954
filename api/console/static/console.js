// genq console: plain JavaScript, no build step, no dependencies (see api/console/__init__.py).
// Talks only to the public REST API and its event streams, with the key in the Authorization header.
"use strict";
(() => {
  const KEY = "genq.key";
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const STATUSES = ["queued", "running", "succeeded", "failed", "canceled"];
  const state = { key: null, admin: false, models: null };
  let current = null; // the view's AbortController: ended when another view is drawn
  let blobs = []; // object URLs of the view's media, revoked with it

  // ---- DOM -----------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (["value", "checked", "disabled", "hidden", "selected", "textContent"].includes(k)) el[k] = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const $ = (sel, root = document) => root.querySelector(sel);
  const slug = (path) => path.replace(/[^A-Za-z0-9_-]/g, "-");
  const notice = (text) => { $("#notice").textContent = text || ""; };
  const alertBox = (text) => h("p", { class: "alert", role: "alert" }, text);
  const sleep = (ms, signal) => new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }
  function fmtSeconds(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "—";
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }
  function duration(job) {
    if (!job.started_at) return "—";
    const end = job.completed_at ? new Date(job.completed_at) : new Date();
    return fmtSeconds((end - new Date(job.started_at)) / 1000);
  }
  const badge = (status, id) => h("span", { class: `status ${status}`, id }, status);
  function progressOf(p, id) {
    if (!p || !p.total) return h("span", { class: "muted", id }, "—");
    return h("span", { id }, h("progress", { max: p.total, value: p.current, "aria-label": "progress" }), " ",
      h("span", { class: "mono" }, `${p.current}/${p.total} ${p.unit || ""}`));
  }

  // ---- the API -------------------------------------------------------------
  class Problem extends Error {
    constructor(status, body) {
      const detail = (body && (body.detail || body.title)) || `HTTP ${status}`;
      super(detail);
      this.status = status;
      this.errors = (body && Array.isArray(body.errors)) ? body.errors : [];
    }
  }

  async function api(path, { method = "GET", body, form, key } = {}) {
    const headers = { Accept: "application/json" };
    const useKey = key || state.key;
    if (useKey) headers.Authorization = `Bearer ${useKey}`;
    const init = { method, headers };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    if (form) init.body = form;
    let resp;
    try { resp = await fetch(path, init); } catch (err) { throw new Problem(0, { detail: `the API cannot be reached (${err.message})` }); }
    const type = resp.headers.get("Content-Type") || "";
    const data = resp.status === 204 ? null : type.includes("json") ? await resp.json() : await resp.text();
    if (!resp.ok) {
      const problem = new Problem(resp.status, typeof data === "object" ? data : { detail: String(data).slice(0, 300) });
      if (resp.status === 401 && !key && state.key) signOut(`Signed out: ${problem.message}`);
      throw problem;
    }
    return data;
  }

  // Server-Sent Events over fetch(): the streams take the key only as a header,
  // which EventSource cannot send. Resumes with Last-Event-ID like EventSource;
  // a 204 ends it (the job's stream after its end); 429/503 wait Retry-After.
  function stream(path, { onEvent, onOpen, onFail, signal }) {
    let last = null;
    let retry = 2000;
    (async () => {
      while (!signal.aborted) {
        let wait = retry;
        try {
          const headers = { Accept: "text/event-stream", Authorization: `Bearer ${state.key}` };
          if (last !== null) headers["Last-Event-ID"] = last;
          const resp = await fetch(path, { headers, signal });
          if (resp.status === 204) return;
          if (!resp.ok) {
            const body = await resp.json().catch(() => ({}));
            const problem = new Problem(resp.status, body);
            if (resp.status === 401) { signOut(`Signed out: ${problem.message}`); return; }
            if (![429, 503].includes(resp.status)) { onFail?.(problem); return; }
            wait = 1000 * (parseFloat(resp.headers.get("Retry-After")) || 5);
            notice(`Live updates wait: ${problem.message}`);
          } else {
            if ($("#notice").textContent.startsWith("Live updates")) notice("");
            onOpen?.();
            const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
            let buf = "";
            let event = "message";
            let data = [];
            for (;;) {
              const { value, done } = await reader.read();
              if (done) break;
              buf += value;
              let nl;
              while ((nl = buf.indexOf("\n")) >= 0) {
                const line = buf.slice(0, nl).replace(/\r$/, "");
                buf = buf.slice(nl + 1);
                if (line === "") {
                  if (data.length) {
                    let parsed = null;
                    try { parsed = JSON.parse(data.join("\n")); } catch { parsed = data.join("\n"); }
                    if (!signal.aborted) onEvent(event, parsed);
                  }
                  event = "message"; data = [];
                  continue;
                }
                if (line.startsWith(":")) continue;
                const colon = line.indexOf(":");
                const field = colon < 0 ? line : line.slice(0, colon);
                const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                if (field === "data") data.push(val);
                else if (field === "event") event = val;
                else if (field === "id") last = val;
                else if (field === "retry" && /^\d+$/.test(val)) retry = Number(val);
              }
            }
          }
        } catch (err) {
          if (signal.aborted) return;
        }
        await sleep(wait, signal);
      }
    })();
  }

  // An output file: the API serves local storage's to the job's owner only,
  // so it is fetched with the key and shown from a blob: URL; a presigned S3
  // URL is used as it is.
  async function mediaUrl(url) {
    const u = new URL(url, location.href);
    if (/^\/v1\/jobs\/[0-9a-f]{32}\/outputs\//.test(u.pathname) && !u.search) {
      const resp = await fetch(u.pathname, { headers: { Authorization: `Bearer ${state.key}` } });
      if (!resp.ok) throw new Problem(resp.status, await resp.json().catch(() => ({})));
      const blobUrl = URL.createObjectURL(await resp.blob());
      blobs.push(blobUrl);
      return blobUrl;
    }
    return url;
  }
  function mediaItems(output, found = []) {
    if (Array.isArray(output)) output.forEach((v) => mediaItems(v, found));
    else if (output && typeof output === "object") {
      if (typeof output.url === "string" && typeof output.content_type === "string") found.push(output);
      else Object.values(output).forEach((v) => mediaItems(v, found));
    }
    return found;
  }
  function mediaFigure(item, caption) {
    const fig = h("figure", {}, h("figcaption", {}, caption || item.content_type));
    const kind = item.content_type.split("/")[0];
    mediaUrl(item.url).then((src) => {
      const alt = `output ${item.content_type}${item.width ? ` ${item.width}×${item.height}` : ""}`;
      const el = kind === "audio" ? h("audio", { controls: true, src })
        : kind === "video" ? h("video", { controls: true, src })
          : h("img", { src, alt, width: item.width, height: item.height, loading: "lazy" });
      fig.prepend(el);
    }).catch((err) => fig.prepend(h("p", { class: "error" }, `cannot load: ${err.message}`)));
    return fig;
  }

  // ---- sign-in -------------------------------------------------------------
  async function whoami(key) {
    state.models = (await api("/v1/models", { key })).data;
    try { await api("/v1/admin/pools", { key }); state.admin = true; } catch { state.admin = false; }
  }
  async function signIn(key) {
    await whoami(key); // a bad key is 401 here, and nothing is kept
    state.key = key;
    sessionStorage.setItem(KEY, key);
    showNav();
  }
  function signOut(message) {
    sessionStorage.removeItem(KEY);
    state.key = null; state.admin = false; state.models = null;
    showNav();
    notice(message || "Signed out.");
    history.pushState(null, "", "/console");
    route();
  }
  function showNav() {
    $("#nav").hidden = !state.key;
    $("#nav-operators").hidden = !state.admin;
  }

  function viewSignIn(view) {
    const input = h("input", { id: "key", name: "key", type: "password", autocomplete: "off", required: true,
      "aria-describedby": "key-hint key-error" });
    const error = h("p", { class: "field-error", id: "key-error", role: "alert" });
    const form = h("form", { class: "signin field" },
      h("label", { for: "key" }, "API key"), input,
      h("p", { class: "hint", id: "key-hint" }, "Kept in this tab's session storage only, and sent only in the Authorization header."),
      error, h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, "Sign in")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      error.textContent = "";
      try {
        await signIn(input.value.trim());
        notice("");
        route();
      } catch (err) {
        error.textContent = err.status === 401 ? `That key was refused: ${err.message}` : err.message;
        input.setAttribute("aria-invalid", "true");
        input.focus();
      }
    });
    view.append(h("h1", {}, "Sign in"), form);
    return "Sign in";
  }

  // ---- jobs ----------------------------------------------------------------
  function filterSelect(name, label, options, chosen) {
    return h("div", {}, h("label", { for: `filter-${name}` }, label),
      h("select", { id: `filter-${name}`, name },
        h("option", { value: "" }, "any"),
        options.map((o) => h("option", { value: o, selected: o === chosen }, o))));
  }

  // A table of the tenant's jobs matching `filters`, kept current from
  // GET /v1/events: a progress event updates its row, any other reads the job
  // again; a job new to the first page is added at the top.
  function jobsTable(view, filters, cursor, signal, onPage) {
    const tbody = h("tbody");
    const table = h("table", { class: "cards", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Status", "Model", "Type", "Created", "Duration", "Progress"].map((c) => h("th", { scope: "col" }, c)))),
      tbody);
    const empty = h("p", { class: "empty", hidden: true }, "No jobs yet.");
    const rows = new Map();
    const pending = new Map();
    const ignored = new Set();
    let loaded = false;
    let early = [];
    view.append(table, empty);

    function rowFor(job) {
      return h("tr", { "data-job-id": job.id },
        h("td", { "data-label": "Job" }, h("a", { href: `/console/jobs/${job.id}`, class: "mono" }, job.id.slice(0, 12) + "…")),
        h("td", { "data-label": "Status", class: "status-cell" }, badge(job.status)),
        h("td", { "data-label": "Model" }, job.model),
        h("td", { "data-label": "Type" }, job.type),
        h("td", { "data-label": "Created", class: "num" }, fmtTime(job.created_at)),
        h("td", { "data-label": "Duration", class: "num" }, duration(job)),
        h("td", { "data-label": "Progress", class: "progress-cell" }, progressOf(job.progress)));
    }
    const matches = (job) => Object.entries(filters).every(([k, v]) => !v || job[k] === v);
    function put(job) {
      const row = rowFor(job);
      const old = rows.get(job.id);
      if (old) old.replaceWith(row);
      else {
        const after = [...tbody.children].find((tr) => tr.dataset.jobId < job.id);
        tbody.insertBefore(row, after || null);
      }
      rows.set(job.id, row);
      empty.hidden = true;
    }
    function refresh(id) {
      if (pending.has(id)) return;
      pending.set(id, setTimeout(async () => {
        pending.delete(id);
        try {
          const job = await api(`/v1/jobs/${id}`);
          if (signal.aborted) return;
          if (rows.has(id) || matches(job)) put(job); else ignored.add(id);
        } catch (err) { /* deleted meanwhile: leave the row as it was */ }
      }, 100));
    }
    function onEvent(type, ev) {
      if (!ev || !ev.job_id) return;
      if (!loaded) { early.push([type, ev]); return; }
      const row = rows.get(ev.job_id);
      if (!row) {
        if (!cursor && !ignored.has(ev.job_id)) refresh(ev.job_id);
        return;
      }
      if (type === "progress" && ev.data && ev.data.total) {
        row.querySelector(".progress-cell").replaceChildren(progressOf(ev.data));
        const cell = row.querySelector(".status-cell");
        if (cell.textContent === "queued") cell.replaceChildren(badge("running"));
      } else refresh(ev.job_id);
    }
    async function load() {
      const q = new URLSearchParams({ limit: "20" });
      for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
      if (cursor) q.set("cursor", cursor);
      try {
        const page = await api(`/v1/jobs?${q}`);
        if (signal.aborted) return;
        page.data.forEach(put);
        empty.hidden = page.data.length > 0;
        onPage?.(page);
      } catch (err) {
        view.append(alertBox(err.message));
      }
      loaded = true;
      early.forEach(([t, e]) => onEvent(t, e));
      early = [];
    }
    // The stream first: once it is open, nothing that happens after the list is read is missed.
    let opened = false;
    stream("/v1/events", {
      signal, onEvent,
      onOpen: () => { if (!opened) { opened = true; load(); } },
      onFail: (p) => { view.append(alertBox(`Live updates stopped: ${p.message}`)); if (!opened) { opened = true; load(); } },
    });
  }

  async function viewJobs(view, params, signal) {
    const q = new URLSearchParams(location.search);
    const filters = { status: q.get("status") || "", model: q.get("model") || "", type: q.get("type") || "" };
    const cursor = q.get("cursor") || "";
    const models = state.models || [];
    const types = [...new Set([...models.map((m) => m.type), "fine-tune"])].sort();
    const form = h("form", { class: "filters", "aria-label": "Filter jobs" },
      filterSelect("status", "Status", STATUSES, filters.status),
      filterSelect("model", "Model", models.map((m) => m.name), filters.model),
      filterSelect("type", "Type", types, filters.type));
    form.addEventListener("change", () => {
      const next = new URLSearchParams();
      for (const el of form.elements) if (el.value) next.set(el.name, el.value);
      navigate(`/console/jobs${next.toString() ? `?${next}` : ""}`, true);
    });
    form.addEventListener("submit", (e) => e.preventDefault());
    view.append(h("h1", {}, "Jobs"), form);
    const pager = h("div", { class: "actions" });
    jobsTable(view, filters, cursor, signal, (page) => {
      const base = new URLSearchParams(location.search);
      base.delete("cursor");
      if (cursor) pager.append(h("a", { href: `/console/jobs${base.toString() ? `?${base}` : ""}` }, "← Newest"));
      if (page.next_cursor) {
        base.set("cursor", page.next_cursor);
        pager.append(h("a", { href: `/console/jobs?${base}`, id: "older" }, "Older →"));
      }
    });
    view.append(pager);
    return "Jobs";
  }

  // ---- a job ---------------------------------------------------------------
  function lossChart(points) {
    const W = 400; const H = 160; const pad = 28;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("class", "chart");
    svg.setAttribute("id", "loss-chart");
    svg.setAttribute("role", "img");
    const el = (tag, attrs, text) => {
      const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.append(e);
      return e;
    };
    if (!points.length) {
      svg.setAttribute("aria-label", "training loss: no steps yet");
      el("text", { x: pad, y: H / 2 }, "no loss reported yet");
      return svg;
    }
    const xs = points.map((p) => p[0]); const ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs); const x1 = Math.max(...xs, x0 + 1);
    const y0 = Math.min(...ys); const y1 = Math.max(...ys, y0 + 1e-9);
    const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
    const sy = (y) => H - pad - ((y - y0) / (y1 - y0)) * (H - 2 * pad);
    el("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad });
    el("line", { x1: pad, y1: pad, x2: pad, y2: H - pad });
    el("text", { x: 2, y: pad }, y1.toFixed(3));
    el("text", { x: 2, y: H - pad }, y0.toFixed(3));
    el("text", { x: W - pad - 40, y: H - 8 }, `step ${x1}`);
    el("polyline", { points: points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") });
    const [lx, ly] = points[points.length - 1];
    svg.setAttribute("aria-label", `training loss over ${points.length} steps; last ${ly.toFixed(4)} at step ${lx}`);
    el("title", {}, svg.getAttribute("aria-label"));
    return svg;
  }

  async function viewJob(view, [id], signal) {
    view.append(h("h1", {}, "Job ", h("span", { class: "mono" }, id)));
    let job;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    } catch (err) {
      view.append(alertBox(`${err.status === 404 ? "Not found (404)" : "Error"}: ${err.message}`));
      return "Job not found";
    }
    const head = h("div", { class: "job-head" });
    const actions = h("div", { class: "actions" });
    const meta = h("dl", { class: "meta" });
    const out = h("div", { class: "outputs", id: "job-output" });
    const text = h("pre", { class: "live-text", id: "job-text", "aria-live": "polite", hidden: true });
    const chartBox = h("div", { id: "loss" });
    const timeline = h("ol", { class: "timeline", id: "job-events" });
    const deliveries = h("div", { id: "deliveries" });
    const place = h("span", { class: "muted", id: "job-queue" });
    const losses = [];
    let shownOutput = null;

    function drawOutput(output) {
      const key = JSON.stringify(output);
      if (key === shownOutput) return;
      shownOutput = key;
      out.replaceChildren();
      if (!output) return;
      if (typeof output.text === "string") { text.hidden = false; text.textContent = output.text; }
      for (const item of mediaItems(output)) {
        const bits = [item.content_type, item.width && `${item.width}×${item.height}`, item.seed !== undefined && `seed ${item.seed}`];
        out.append(mediaFigure(item, bits.filter(Boolean).join(" · ")));
      }
      if (job.type === "fine-tune" && typeof output.model === "string") {
        out.append(h("p", {}, "New model ", h("code", {}, output.model), " — ",
          h("a", { href: `/console/run?model=${encodeURIComponent(output.model)}`, id: "run-fine-tuned" }, "run it")));
      }
      const rest = Object.fromEntries(Object.entries(output).filter(([k]) => !["text", "images"].includes(k)));
      if (Object.keys(rest).length && typeof output.text !== "string" && !output.images) out.append(h("pre", {}, JSON.stringify(rest, null, 2)));
    }
    function draw() {
      head.replaceChildren(badge(job.status, "job-status"), progressOf(job.progress, "job-progress"), place);
      if (job.status !== "queued") place.textContent = "";
      else if (job.queue) place.textContent = `place in line ${job.queue.position}${job.queue.eta_seconds != null ? `, starts in about ${fmtSeconds(job.queue.eta_seconds)}` : ""}`;
      const rows = [["Model", job.model], ["Type", job.type], ["Created", fmtTime(job.created_at)],
        ["Started", fmtTime(job.started_at)], ["Completed", fmtTime(job.completed_at)], ["Duration", duration(job)],
        ["Attempts", job.attempts], ["Priority", job.priority], ["Webhook", job.webhook || "—"]];
      if (job.error) rows.push(["Error", `${job.error.code}: ${job.error.message}`]);
      meta.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
      actions.replaceChildren();
      if (!TERMINAL.has(job.status)) {
        actions.append(h("button", { type: "button", class: "danger", id: "cancel", disabled: job.cancel_requested,
          onclick: async (e) => {
            e.target.disabled = true;
            try { job = await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }); draw(); } catch (err) { actions.append(alertBox(err.message)); e.target.disabled = false; }
          } }, job.cancel_requested ? "Cancel requested" : "Cancel"));
      }
      if (state.admin && job.status === "failed") {
        actions.append(h("button", { type: "button", id: "retry", onclick: async () => {
          try { await api(`/v1/admin/jobs/${job.id}/retry`, { method: "POST" }); route(); } catch (err) { actions.append(alertBox(err.message)); }
        } }, "Retry (admin)"));
      }
      drawOutput(job.output);
      if (job.type === "fine-tune") chartBox.replaceChildren(h("h2", {}, "Training loss"), lossChart(losses));
    }
    async function loadDeliveries() {
      try {
        const page = await api(`/v1/jobs/${job.id}/webhook-deliveries?limit=50`);
        if (!page.data.length) { deliveries.replaceChildren(h("p", { class: "muted" }, job.webhook ? "No deliveries yet." : "This job has no webhook.")); return; }
        deliveries.replaceChildren(h("div", { class: "actions" }, h("button", { type: "button", onclick: loadDeliveries }, "Refresh deliveries")),
          h("table", { class: "cards" },
          h("thead", {}, h("tr", {}, ["Event", "Status", "Attempts", "Last answer", "Next attempt", ""].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, page.data.map((d) => h("tr", {},
            h("td", { "data-label": "Event" }, d.event),
            h("td", { "data-label": "Status" }, badge(d.status)),
            h("td", { "data-label": "Attempts", class: "num" }, d.attempts.length),
            h("td", { "data-label": "Last answer" }, d.last_status_code || d.last_error || "—"),
            h("td", { "data-label": "Next attempt" }, fmtTime(d.next_attempt_at)),
            // The API refuses to redeliver an event still on its way (409): offered once it ended.
            h("td", { "data-label": "" }, h("button", { type: "button", disabled: ["pending", "delivering"].includes(d.status), onclick: async (e) => {
              e.target.disabled = true;
              try { await api(`/v1/jobs/${job.id}/webhook-deliveries/${d.id}/redeliver`, { method: "POST" }); loadDeliveries(); } catch (err) { deliveries.append(alertBox(err.message)); e.target.disabled = false; }
            } }, "Redeliver")))))));
      } catch (err) { deliveries.replaceChildren(alertBox(err.message)); }
    }
    async function reread() {
      try { job = await api(`/v1/jobs/${job.id}`); if (!signal.aborted) draw(); } catch { /* deleted */ }
    }
    function note(ev, summary) {
      const last = timeline.lastElementChild;
      const li = h("li", { "data-type": ev.type }, h("time", { datetime: ev.at }, fmtTime(ev.at)), h("strong", {}, ev.type), summary ? ` — ${summary}` : "");
      // Progress is noted once, updated in place: a long run's hundreds of steps are one line.
      if (ev.type === "progress" && last && last.dataset.type === "progress") last.replaceWith(li);
      else timeline.append(li);
    }

    view.append(head, actions, meta, h("h2", {}, "Output"), text, out, chartBox,
      h("h2", {}, "Input"), h("pre", { id: "job-input" }, JSON.stringify(job.input, null, 2)),
      h("h2", {}, "Events"), timeline, h("h2", {}, "Webhook deliveries"), deliveries);
    draw();
    loadDeliveries();
    let liveText = "";
    stream(`/v1/jobs/${job.id}/events`, {
      signal,
      onFail: (p) => view.append(alertBox(`Live updates stopped: ${p.message}`)),
      onEvent: (type, ev) => {
        if (type === "queue") { job.queue = ev; if (job.status === "queued") draw(); return; }
        if (type === "output" && ev && typeof ev.delta === "string") {
          liveText += ev.delta;
          text.hidden = false;
          text.textContent = liveText;
          return;
        }
        if (!ev || !ev.type) return;
        const d = ev.data || {};
        if (ev.type === "progress") {
          job.progress = { ...d };
          if (job.status === "queued") job.status = "running";
          if (typeof d.loss === "number") losses.push([d.current, d.loss]);
          draw();
          note(ev, `${d.current}/${d.total} ${d.unit || ""}${typeof d.loss === "number" ? `, loss ${d.loss.toFixed(4)}` : ""}`);
          return;
        }
        if (ev.type === "output") { drawOutput(d); note(ev, "output stored"); return; }
        note(ev, d.status || d.message || (d.attempt ? `attempt ${d.attempt}` : ""));
        reread().then(() => { if (ev.type === "completed") loadDeliveries(); });
      },
    });
    return `Job ${id.slice(0, 12)}`;
  }

  // ---- a form from a JSON schema ---------------------------------------------
  // Each property becomes a labelled control; nested objects a fieldset. Empty
  // controls are left out of the input, so the model's defaults apply. Errors
  // come from the API's problem+json (`errors[].field`, e.g. input.width) and
  // are shown beside the control they name.
  function schemaForm(schema, prefix, fields) {
    const grid = h("div", { class: "form" });
    const required = new Set(schema.required || []);
    for (const [name, raw] of Object.entries(schema.properties || {})) {
      const path = `${prefix}.${name}`;
      let prop = raw;
      if (raw.anyOf) {
        const non = raw.anyOf.filter((s) => s.type !== "null");
        if (non.length === 1) prop = { ...raw, ...non[0] };
      }
      const title = raw.title || name;
      if (prop.type === "object" && prop.properties) {
        grid.append(h("fieldset", {}, h("legend", {}, title), schemaForm(prop, path, fields)));
        continue;
      }
      const id = `field-${slug(path)}`;
      const errId = `error-${slug(path)}`;
      const hintId = `hint-${slug(path)}`;
      const common = { id, name: path, "aria-describedby": `${hintId} ${errId}`, required: required.has(name) || null };
      const hasDefault = raw.default !== undefined && raw.default !== null;
      let control; let kind = "text";
      if (Array.isArray(prop.enum)) {
        kind = "enum";
        control = h("select", common, required.has(name) ? null : h("option", { value: "" }, hasDefault ? `default (${raw.default})` : "default"),
          prop.enum.map((v) => h("option", { value: v, selected: v === raw.default && required.has(name) }, v)));
      } else if (prop.type === "boolean") {
        kind = "boolean";
        control = h("input", { ...common, type: "checkbox", checked: raw.default === true });
      } else if (prop.type === "integer" || prop.type === "number") {
        kind = prop.type;
        const max = prop.maximum ?? (prop.exclusiveMaximum !== undefined ? prop.exclusiveMaximum : null);
        const min = prop.minimum ?? (prop.exclusiveMinimum !== undefined ? prop.exclusiveMinimum : null);
        control = h("input", { ...common, type: "number", inputmode: prop.type === "integer" ? "numeric" : "decimal",
          step: prop.multipleOf || (prop.type === "integer" ? 1 : "any"), min, max, value: hasDefault ? raw.default : null,
          placeholder: hasDefault ? null : "default" });
      } else if (prop.type === "array" && prop.items && prop.items.type === "string") {
        kind = "lines";
        control = h("textarea", { ...common, rows: 3, placeholder: "one per line" });
      } else if (prop.type === "array" || prop.type === "object") {
        kind = "json";
        control = h("textarea", { ...common, rows: 4, placeholder: "JSON" });
      } else if (/prompt/.test(name) || (prop.maxLength || 0) > 300) {
        control = h("textarea", { ...common, rows: name === "prompt" ? 3 : 2, value: hasDefault ? raw.default : "" });
      } else {
        control = h("input", { ...common, type: "text", value: hasDefault ? raw.default : "", autocomplete: "off" });
      }
      const error = h("p", { class: "field-error", id: errId });
      const hint = h("p", { class: "hint", id: hintId }, raw.description || "");
      const wide = control.tagName === "TEXTAREA";
      const box = h("div", { class: `field${wide ? " wide" : ""}`, "data-field": path },
        h("label", { for: id }, title, required.has(name) ? h("span", { "aria-hidden": "true", class: "req" }, " *") : null), control, hint);
      // A file id field (an input image, a fine-tune's dataset) can be filled by an upload.
      if (/file id|POST \/v1\/files/.test(raw.description || "")) {
        const purpose = name === "training_file" ? "fine-tune" : "image";
        const upId = `upload-${slug(path)}`;
        const up = h("input", { type: "file", id: upId, accept: purpose === "image" ? "image/png,image/jpeg,image/webp" : ".jsonl,application/jsonl,application/json" });
        up.addEventListener("change", async () => {
          if (!up.files.length) return;
          const form = new FormData();
          form.append("purpose", purpose);
          form.append("file", up.files[0]);
          error.textContent = "";
          try {
            const file = await api("/v1/files", { method: "POST", form });
            control.value = file.id;
            hint.textContent = `Uploaded ${file.filename} (${file.bytes} bytes${file.rows ? `, ${file.rows} rows` : ""}) as ${file.id}.`;
          } catch (err) {
            error.textContent = err.errors.map((e) => e.message).join("; ") || err.message;
          }
        });
        box.append(h("label", { for: upId }, `Upload ${purpose === "image" ? "an image" : "a dataset"}`), up);
      }
      box.append(error);
      fields.set(path, { control, error, kind });
      grid.append(box);
    }
    return grid;
  }
  function collect(fields) {
    const out = {};
    const problems = [];
    for (const [path, { control, kind }] of fields) {
      let value;
      if (kind === "boolean") value = control.checked;
      else {
        const raw = control.value;
        if (raw === "") continue;
        if (kind === "integer" || kind === "number") value = Number(raw);
        else if (kind === "lines") value = raw.split("\n").map((s) => s.trim()).filter(Boolean);
        else if (kind === "json") {
          try { value = JSON.parse(raw); } catch (err) { problems.push({ field: path, message: `is not valid JSON: ${err.message}` }); continue; }
        } else value = raw;
      }
      const parts = path.split(".");
      let node = out;
      for (const p of parts.slice(0, -1)) node = node[p] = node[p] || {};
      node[parts[parts.length - 1]] = value;
    }
    return { value: out, problems };
  }
  function showErrors(fields, alertEl, problem) {
    for (const { control, error } of fields.values()) { error.textContent = ""; control.removeAttribute("aria-invalid"); }
    alertEl.replaceChildren();
    if (!problem) return;
    let first = null;
    const unplaced = [];
    for (const e of problem.errors) {
      // The longest field path that names a control: input.messages.0.content shows at input.messages.
      const parts = String(e.field || "").split(".");
      let target = null;
      for (let n = parts.length; n > 0 && !target; n--) target = fields.get(parts.slice(0, n).join("."));
      if (target) {
        target.error.textContent = target.error.textContent ? `${target.error.textContent}; ${e.message}` : e.message;
        target.control.setAttribute("aria-invalid", "true");
        first = first || target.control;
      } else unplaced.push(e);
    }
    alertEl.append(alertBox(first && !unplaced.length ? `${problem.message} (see the field marked below)` : problem.message));
    (first || alertEl).focus?.();
  }

  async function submitJob(body, fields, alertEl, button) {
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body });
      navigate(`/console/jobs/${job.id}`);
    } catch (err) {
      showErrors(fields, alertEl, err);
    } finally {
      button.disabled = false;
    }
  }

  async function viewRun(view, params, signal) {
    view.append(h("h1", {}, "Run a model"));
    // Read again: a fine-tune finished since sign-in adds a model.
    const models = state.models = (await api("/v1/models")).data;
    const q = new URLSearchParams(location.search);
    const chosen = models.find((m) => m.name === q.get("model")) || models[0];
    if (!chosen) { view.append(h("p", { class: "empty" }, "No models are served.")); return "Run a model"; }
    const pick = h("select", { id: "run-model", name: "model" }, models.map((m) => h("option", { value: m.name, selected: m === chosen }, `${m.name} (${m.type})`)));
    pick.addEventListener("change", () => navigate(`/console/run?model=${encodeURIComponent(pick.value)}`, true));
    const fields = new Map();
    const alertEl = h("div", { tabindex: "-1" });
    const button = h("button", { type: "submit", class: "primary", id: "submit" }, "Run");
    const options = {
      type: "object",
      properties: {
        priority: { type: "integer", title: "Priority", minimum: -100, maximum: 100, description: "Higher runs first among your own jobs." },
        webhook: { type: "string", title: "Webhook URL", description: "Where to POST the job's events (https, a public host)." },
      },
    };
    const form = h("form", { novalidate: true, "aria-label": `Input of ${chosen.name}` },
      h("div", { class: "field" }, h("label", { for: "run-model" }, "Model"), pick,
        h("p", { class: "hint" }, chosen.description || ""), h("p", { class: "field-error", id: "error-model" })),
      alertEl,
      h("h2", {}, "Input"), schemaForm(chosen.input_schema, "input", fields),
      h("h2", {}, "Options"), schemaForm(options, "opt", fields),
      h("div", { class: "actions" }, button));
    fields.set("model", { control: pick, error: $("#error-model", form), kind: "text" });
    for (const name of ["priority", "webhook"]) fields.set(name, fields.get(`opt.${name}`));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const { value, problems } = collect(new Map([...fields].filter(([k]) => k.startsWith("input.") || k.startsWith("opt."))));
      if (problems.length) { showErrors(fields, alertEl, Object.assign(new Problem(0, { detail: "Fix the fields marked below." }), { errors: problems })); return; }
      submitJob({ model: chosen.name, input: value.input || {}, ...(value.opt || {}) }, fields, alertEl, button);
    });
    view.append(form);
    return "Run a model";
  }

  // ---- gallery -------------------------------------------------------------
  async function viewGallery(view, params, signal) {
    view.append(h("h1", {}, "Gallery"), h("p", { class: "muted" }, "Images your jobs made, newest first."));
    const grid = h("div", { class: "gallery", id: "gallery" });
    const more = h("button", { type: "button", hidden: true }, "Load more");
    const empty = h("p", { class: "empty", hidden: true }, "No images yet: run an image model.");
    view.append(grid, empty, h("div", { class: "actions" }, more));
    let cursor = null;
    async function load() {
      more.disabled = true;
      let shown = 0;
      // Succeeded jobs, newest first, a page at a time until a screenful of images (at most 10 pages a click).
      for (let pages = 0; pages < 10 && shown < 24; pages++) {
        const q = new URLSearchParams({ status: "succeeded", limit: "50" });
        if (cursor) q.set("cursor", cursor);
        const page = await api(`/v1/jobs?${q}`);
        if (signal.aborted) return;
        for (const job of page.data) {
          for (const item of mediaItems(job.output).filter((m) => m.content_type.startsWith("image/"))) {
            const fig = mediaFigure(item, "");
            fig.querySelector("figcaption").replaceChildren(h("a", { href: `/console/jobs/${job.id}` }, job.model), ` · ${fmtTime(job.created_at)}`);
            grid.append(fig);
            shown++;
          }
        }
        cursor = page.next_cursor;
        if (!cursor) break;
      }
      more.hidden = !cursor;
      more.disabled = false;
      empty.hidden = grid.children.length > 0;
    }
    more.addEventListener("click", load);
    await load();
    return "Gallery";
  }

  // ---- fine-tunes ----------------------------------------------------------
  async function viewFineTunes(view, params, signal) {
    view.append(h("h1", {}, "Fine-tunes"));
    const bases = (state.models || []).filter((m) => m.type === "text-generation" && m.owned_by === "genq");
    const doc = await fetch("/openapi.json").then((r) => r.json());
    const schemas = doc.components.schemas;
    const schemaFor = (base) => {
      for (const [name, s] of Object.entries(schemas)) {
        if (!name.startsWith("JobCreate_fine_tune")) continue;
        if ((s.properties.model.enum || []).includes(base)) return schemas[s.properties.input.$ref.split("/").pop()];
      }
      return null;
    };
    const q = new URLSearchParams(location.search);
    const base = bases.find((m) => m.name === q.get("model")) || bases[0];
    if (base && schemaFor(base.name)) {
      const fields = new Map();
      const pick = h("select", { id: "ft-model", name: "model" }, bases.map((m) => h("option", { value: m.name, selected: m === base }, m.name)));
      pick.addEventListener("change", () => navigate(`/console/fine-tunes?model=${encodeURIComponent(pick.value)}`, true));
      const alertEl = h("div", { tabindex: "-1" });
      const button = h("button", { type: "submit", class: "primary", id: "submit" }, "Start fine-tune");
      const form = h("form", { novalidate: true, "aria-label": "Start a fine-tune" },
        h("div", { class: "field" }, h("label", { for: "ft-model" }, "Base model"), pick, h("p", { class: "field-error", id: "error-ft-model" })),
        alertEl, schemaForm(schemaFor(base.name), "input", fields), h("div", { class: "actions" }, button));
      fields.set("model", { control: pick, error: $("#error-ft-model", form), kind: "text" });
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const { value, problems } = collect(new Map([...fields].filter(([k]) => k.startsWith("input."))));
        if (problems.length) { showErrors(fields, alertEl, Object.assign(new Problem(0, { detail: "Fix the fields marked below." }), { errors: problems })); return; }
        submitJob({ model: base.name, type: "fine-tune", input: value.input || {} }, fields, alertEl, button);
      });
      view.append(h("h2", {}, "Start one"), h("p", { class: "muted" }, "Upload a JSONL dataset (rows of {\"prompt\", \"completion\"} or {\"text\"}), then start."), form);
    } else {
      view.append(h("p", { class: "empty" }, "No model here can be fine-tuned."));
    }
    view.append(h("h2", {}, "Your fine-tunes"));
    jobsTable(view, { type: "fine-tune" }, "", signal);
    return "Fine-tunes";
  }

  // ---- operators -----------------------------------------------------------
  async function viewOperators(view, params, signal) {
    view.append(h("h1", {}, "Operators"));
    if (!state.admin) {
      view.append(alertBox("This page needs an admin key; yours is a tenant's."));
      return "Operators";
    }
    const pools = h("tbody");
    const workers = h("tbody");
    const errors = h("div");
    const stamp = h("p", { class: "muted", "aria-live": "off" });
    const cols = (names) => h("thead", {}, h("tr", {}, names.map((c) => h("th", { scope: "col" }, c))));
    view.append(h("h2", {}, "Pools"), errors,
      h("table", { class: "cards", id: "pools-table" }, cols(["Pool", "Models", "State", "Queued", "Running", "Oldest queued", "Workers", "Done (5 min)", "Per minute", ""]), pools),
      h("h2", {}, "Workers"),
      h("table", { class: "cards", id: "workers-table" }, cols(["Worker", "Pools", "Heartbeat", "Running jobs", "Started", "State", ""]), workers),
      stamp);
    const act = async (path) => {
      try { await api(path, { method: "POST" }); errors.replaceChildren(); } catch (err) { errors.replaceChildren(alertBox(err.message)); }
      await refresh();
    };
    async function refresh() {
      try {
        const [p, w] = await Promise.all([api("/v1/admin/pools"), api("/v1/admin/workers")]);
        if (signal.aborted) return;
        pools.replaceChildren(...p.data.map((r) => h("tr", { "data-pool": r.name },
          h("td", { "data-label": "Pool", class: "mono" }, r.name),
          h("td", { "data-label": "Models" }, r.models.join(", ") || "—",
            Object.entries(r.model_errors || {}).map(([m, e]) => h("div", { class: "error" }, `${m}: ${e}`))),
          h("td", { "data-label": "State", class: "pool-state" }, badge(r.paused ? "paused" : "active")),
          h("td", { "data-label": "Queued", class: "num" }, r.queued),
          h("td", { "data-label": "Running", class: "num" }, r.running),
          h("td", { "data-label": "Oldest queued", class: "num" }, fmtSeconds(r.oldest_queued_seconds)),
          h("td", { "data-label": "Workers", class: "num" }, r.workers),
          h("td", { "data-label": "Done (5 min)", class: "num" }, r.succeeded_last_5m),
          h("td", { "data-label": "Per minute", class: "num" }, r.throughput_per_minute.toFixed(1)),
          h("td", { "data-label": "" }, r.paused
            ? h("button", { type: "button", "aria-label": `Resume pool ${r.name}`, onclick: () => act(`/v1/admin/pools/${encodeURIComponent(r.name)}/resume`) }, "Resume")
            : h("button", { type: "button", class: "danger", "aria-label": `Pause pool ${r.name}`, onclick: () => act(`/v1/admin/pools/${encodeURIComponent(r.name)}/pause`) }, "Pause")))));
        workers.replaceChildren(...(w.data.length ? w.data.map((r) => h("tr", {},
          h("td", { "data-label": "Worker", class: "mono" }, r.name),
          h("td", { "data-label": "Pools" }, r.pools.join(", ")),
          h("td", { "data-label": "Heartbeat" }, `${fmtSeconds((Date.now() - new Date(r.last_seen_at)) / 1000)} ago`, r.alive ? "" : " (gone)"),
          h("td", { "data-label": "Running jobs", class: "num" }, r.running_jobs),
          h("td", { "data-label": "Started" }, fmtTime(r.started_at)),
          h("td", { "data-label": "State" }, badge(r.draining ? "draining" : r.alive ? "active" : "gone")),
          h("td", { "data-label": "" }, r.draining || !r.alive ? "" : h("button", { type: "button", "aria-label": `Drain worker ${r.name}`, onclick: () => {
            if (window.confirm(`Drain ${r.name}? It finishes its jobs, takes no more, and stops.`)) act(`/v1/admin/workers/${encodeURIComponent(r.name)}/drain`);
          } }, "Drain")))) : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No worker has reported."))]));
        stamp.textContent = `Updated ${fmtTime(new Date().toISOString())}; refreshed every 5 s.`;
      } catch (err) {
        errors.replaceChildren(alertBox(err.message));
      }
    }
    await refresh();
    (async () => { while (!signal.aborted) { await sleep(5000, signal); if (!signal.aborted) await refresh(); } })();
    return "Operators";
  }

  // ---- routing -------------------------------------------------------------
  const ROUTES = [
    [/^\/console\/jobs\/?$/, viewJobs, "/console/jobs"],
    [/^\/console\/jobs\/([^/]+)$/, viewJob, "/console/jobs"],
    [/^\/console\/run\/?$/, viewRun, "/console/run"],
    [/^\/console\/gallery\/?$/, viewGallery, "/console/gallery"],
    [/^\/console\/fine-tunes\/?$/, viewFineTunes, "/console/fine-tunes"],
    [/^\/console\/operators\/?$/, viewOperators, "/console/operators"],
  ];

  function navigate(path, replace = false) {
    history[replace ? "replaceState" : "pushState"](null, "", path);
    route(true);
  }

  async function route(focus = false) {
    current?.abort();
    blobs.forEach((u) => URL.revokeObjectURL(u));
    blobs = [];
    const ctl = new AbortController();
    current = ctl;
    const main = $("#main");
    const view = h("div", { class: "view" });
    main.replaceChildren(view);
    let title;
    if (!state.key) title = viewSignIn(view);
    else {
      if (/^\/console\/?$/.test(location.pathname)) history.replaceState(null, "", "/console/jobs");
      const path = decodeURI(location.pathname);
      const found = ROUTES.map(([re, fn, nav]) => [path.match(re), fn, nav]).find(([m]) => m);
      for (const a of document.querySelectorAll("#nav a")) {
        if (found && a.getAttribute("href") === found[2]) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
      }
      if (!found) {
        view.append(h("h1", {}, "No such page"), h("p", {}, h("a", { href: "/console/jobs" }, "Your jobs")));
        title = "No such page";
      } else {
        try {
          title = await found[1](view, found[0].slice(1), ctl.signal);
        } catch (err) {
          if (!ctl.signal.aborted) view.append(alertBox(err.message));
        }
      }
    }
    if (current === ctl) {
      document.title = `${title || "genq"} · genq console`;
      if (focus) main.focus();
    }
  }

  document.addEventListener("click", (e) => {
    const a = e.target.closest("a[href]");
    if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || !url.pathname.startsWith("/console")) return;
    e.preventDefault();
    navigate(url.pathname + url.search);
  });
  window.addEventListener("popstate", () => route());

  async function boot() {
    $("#sign-out").addEventListener("click", () => signOut());
    const fragment = location.hash.match(/^#key=(.+)$/);
    if (fragment) {
      // The key came in the fragment (never sent to a server): take it and clear it from the address bar.
      history.replaceState(null, "", location.pathname + location.search);
      try { await signIn(decodeURIComponent(fragment[1])); } catch (err) { notice(`The key in the link was refused: ${err.message}`); }
    } else if (sessionStorage.getItem(KEY)) {
      try {
        await whoami(sessionStorage.getItem(KEY));
        state.key = sessionStorage.getItem(KEY);
      } catch (err) {
        sessionStorage.removeItem(KEY);
        notice(`Signed out: ${err.message}`);
      }
      showNav();
    }
    route();
  }
  boot();
})();
