// jetpipe dashboard: keeps a job page live by polling the JSON API. Text is always set with textContent:
// what processing services write (failure reasons, log lines) is shown as text, never run as markup.
"use strict";
const jetpipe = (() => {
  const TERMINAL = ["SUCCESS", "FAILURE", "REVOKED"];
  const $ = (id) => document.getElementById(id);
  const setText = (id, value) => { const el = $(id); if (el) el.textContent = value; };

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  }

  function showJob(job) {
    const status = $("job-status");
    if (status.textContent !== job.status) status.textContent = job.status;  // a live region: only on change
    status.className = `badge status-${job.outcome}`;
    for (const name of ["collect", "process", "results"]) {
      const stage = job.stages[name] || {};
      const percent = Math.round((stage.progress || 0) * 1000) / 10;
      const bar = $(`bar-${name}`);
      bar.style.width = `${percent}%`;
      bar.className = `fill status-${stage.status || "CREATED"}`;
      $(`progress-${name}`).setAttribute("aria-valuenow", String(percent));
      setText(`stage-${name}`, `${stage.status || "CREATED"} ${percent}%`);
    }
    for (const key of ["processed", "succeeded", "failed", "received", "remaining", "captures", "detections",
                       "classifications"]) {
      setText(`c-${key}`, job[key].toLocaleString("en"));
    }
    setText("c-rate", job.rate_text || "–");
    setText("c-eta", job.eta_text || "–");
    const ended = $("job-ended");
    if (ended) {
      ended.hidden = !job.finished_at;
      setText("ended-at", job.finished_at || "");
      setText("took", job.elapsed_text || "");
    }
    const error = $("job-error");
    error.textContent = job.error || "";
    error.hidden = !job.error;
    const over = TERMINAL.includes(job.status);
    const cancel = $("cancel-form");
    if (cancel) cancel.hidden = over;
    const retry = $("retry-form");
    if (retry) retry.hidden = !(over && job.failed > 0);
    const paused = $("job-paused");
    if (paused) {
      paused.hidden = !job.paused;
      setText("paused-at", job.paused_at || "");
      setText("pause-reason", job.pause_reason ? `: ${job.pause_reason}` : "");
    }
    const pause = $("pause-form");
    if (pause) pause.hidden = over || job.paused || job.dispatch_mode !== "async_api";
    const resume = $("resume-form");
    if (resume) resume.hidden = over || !job.paused;
    setText("job-priority", job.priority_name);
    return over;
  }

  async function showFailures(jobId) {
    const page = await getJSON(`/api/v1/jobs/${jobId}/failures?limit=50`);
    const body = $("failures").tBodies[0];
    const rows = page.failures.map((f) => {
      const row = document.createElement("tr");
      for (const [text, cls] of [[f.image_id, ""], [f.url, "url"], [f.error || "", "reason"]]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        if (cls) cell.className = cls;
        row.append(cell);
      }
      return row;
    });
    if (rows.length) body.replaceChildren(...rows);
  }

  async function showTaxa(jobId) {
    const page = await getJSON(`/api/v1/jobs/${jobId}/taxa?limit=30`);
    if (!page.taxa.length) return;
    const most = page.taxa[0].detections;
    $("taxa").tBodies[0].replaceChildren(...page.taxa.map((t) => {
      const row = document.createElement("tr");
      const share = cell(undefined, "bar-col");
      const bar = document.createElement("div");
      bar.className = "bar small";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = `${Math.round((t.detections / most) * 1000) / 10}%`;
      bar.append(fill);
      share.append(bar);
      row.append(cell(t.taxon), cell(t.detections.toLocaleString("en"), "num"), share,
                 cell(t.mean_score.toFixed(2), "num"));
      return row;
    }));
  }

  async function followJob(jobId) {
    const afterParam = new URLSearchParams(window.location.search).get("after");
    let shownFailed = Number($("c-failed").textContent.replace(/,/g, ""));
    let shownDetections = Number($("c-detections").textContent.replace(/,/g, ""));
    let lastLine = 0;
    let ended = $("job").dataset.terminal === "yes";
    let lastLook = ended;
    const log = $("log");
    const tick = async () => {
      try {
        const page = await getJSON(`/api/v1/jobs/${jobId}/logs?after=${lastLine}`);
        for (const line of page.lines) {
          log.append(document.createTextNode(`${line.at} ${line.level.padEnd(7)} ${line.message}\n`));
        }
        lastLine = page.last;
        if (page.lines.length) log.scrollTop = log.scrollHeight;
        if (!ended) {
          const job = await getJSON(`/api/v1/jobs/${jobId}`);
          ended = showJob(job);
          if (job.detections !== shownDetections) {
            shownDetections = job.detections;
            await showTaxa(jobId);
          }
          if (job.failed !== shownFailed && !afterParam) {
            shownFailed = job.failed;
            await showFailures(jobId);
          }
        }
      } catch (error) {
        console.warn("jetpipe: refresh failed", error);
      }
      if (!ended) {
        setTimeout(tick, 1000);
      } else if (!lastLook) {  // the lines logged as it ended (cleanup) come a moment later
        lastLook = true;
        setTimeout(tick, 1500);
      }
    };
    await tick();
  }

  const cell = (text, className) => {
    const td = document.createElement("td");
    if (text !== undefined) td.textContent = text;
    if (className) td.className = className;
    return td;
  };
  const link = (href, text) => {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  };

  // The jobs list: its rows follow the jobs (status, progress, time) without a reload.
  function jobRow(job) {
    const row = document.createElement("tr");
    row.dataset.job = String(job.id);
    const percent = job.settled_percent;
    const status = cell();
    const badge = document.createElement("span");
    badge.className = `badge status-${job.outcome}`;
    badge.textContent = job.status;
    status.append(badge);
    if (job.paused) {
      const paused = document.createElement("span");
      paused.className = "badge paused";
      paused.textContent = "paused";
      status.append(" ", paused);
    }
    const progress = cell(undefined, "progress-cell");
    const bar = document.createElement("div");
    bar.className = "bar small";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-label", `job ${job.id} progress`);
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", String(percent));
    const fill = document.createElement("div");
    fill.className = `fill status-${job.status}`;
    fill.style.width = `${percent}%`;
    bar.append(fill);
    const text = document.createElement("span");
    text.className = "progress-text";
    text.textContent = `${job.processed.toLocaleString("en")} / ${job.total_images.toLocaleString("en")}`;
    progress.append(bar, text);
    const id = cell();
    id.append(link(`/jobs/${job.id}`, String(job.id)));
    const name = cell();
    name.append(link(`/jobs/${job.id}`, job.name));
    row.append(id, name, cell(job.project), cell(job.pipeline), cell(job.priority_name), status, progress,
               cell(job.failed.toLocaleString("en")), cell(job.detections.toLocaleString("en")),
               cell(job.eta_text ? `ends in ${job.eta_text}` : (job.elapsed_text || "")), cell(job.created_at || ""));
    return row;
  }

  async function followJobs(table) {
    const query = new URLSearchParams(table.dataset.live);
    const params = new URLSearchParams({ limit: "50" });
    for (const key of ["status", "pipeline", "project", "q", "before"]) {
      const value = query.get(key);
      if (value) params.set(key, value);
    }
    const tick = async () => {
      try {
        const listing = await getJSON(`/api/v1/jobs?${params}`);
        if (listing.jobs.length) table.tBodies[0].replaceChildren(...listing.jobs.map(jobRow));
        for (const [name, count] of Object.entries(listing.counts)) {
          const counter = document.querySelector(`#status-counts .status-${name} b`);
          if (counter) counter.textContent = String(count);
        }
      } catch (error) {
        // a failed look: the next one tries again
      }
      setTimeout(tick, 2000);
    };
    setTimeout(tick, 2000);
  }

  // No inline script or style on any page (the Content-Security-Policy forbids them): what a page needs
  // is in data- attributes, acted on here.
  function start() {
    for (const bar of document.querySelectorAll(".fill[data-percent]")) bar.style.width = `${bar.dataset.percent}%`;
    for (const element of document.querySelectorAll("[data-confirm]")) {  // a form on submit, a button on click
      element.addEventListener(element.tagName === "FORM" ? "submit" : "click", (event) => {
        if (!window.confirm(element.dataset.confirm)) event.preventDefault();
      });
    }
    const followed = document.querySelector("[data-follow-job]");
    if (followed) followJob(Number(followed.dataset.followJob));
    const jobs = document.querySelector("table#jobs[data-live]");
    if (jobs) followJobs(jobs);
    const refresh = $("auto-refresh");
    if (refresh) {  // a page that looks again on its own, unless the person turns it off (kept for the tab)
      refresh.checked = sessionStorage.getItem("jetpipe-auto-refresh") !== "off";
      refresh.addEventListener("change", () => {
        sessionStorage.setItem("jetpipe-auto-refresh", refresh.checked ? "on" : "off");
        if (refresh.checked) window.location.reload();
      });
      setTimeout(() => { if (refresh.checked) window.location.reload(); }, Number(refresh.dataset.refreshS) * 1000);
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();

  return { followJob };
})();
