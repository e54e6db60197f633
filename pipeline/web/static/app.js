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
    status.textContent = job.status;
    status.className = `badge status-${job.status}`;
    for (const name of ["collect", "process", "results"]) {
      const stage = job.stages[name] || {};
      const percent = Math.round((stage.progress || 0) * 1000) / 10;
      const bar = $(`bar-${name}`);
      bar.style.width = `${percent}%`;
      bar.className = `fill status-${stage.status || "CREATED"}`;
      setText(`stage-${name}`, `${stage.status || "CREATED"} ${percent}%`);
    }
    for (const key of ["processed", "failed", "received", "remaining", "captures", "detections", "classifications"]) {
      setText(`c-${key}`, String(job[key]));
    }
    setText("c-rate", job.images_per_s == null ? "–" : String(job.images_per_s));
    setText("c-eta", job.eta_s == null ? "–" : `${job.eta_s} s`);
    const error = $("job-error");
    error.textContent = job.error || "";
    error.hidden = !job.error;
    const ended = TERMINAL.includes(job.status);
    const cancel = $("cancel-form");
    if (cancel) cancel.hidden = ended;
    const retry = $("retry-form");
    if (retry) retry.hidden = !(ended && job.failed > 0);
    const paused = $("job-paused");
    if (paused) {
      paused.hidden = !job.paused;
      setText("paused-at", job.paused_at || "");
      setText("pause-reason", job.pause_reason ? `: ${job.pause_reason}` : "");
    }
    const pause = $("pause-form");
    if (pause) pause.hidden = ended || job.paused || job.dispatch_mode !== "async_api";
    const resume = $("resume-form");
    if (resume) resume.hidden = ended || !job.paused;
    setText("job-priority", job.priority_name);
    return ended;
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

  async function followJob(jobId) {
    const afterParam = new URLSearchParams(window.location.search).get("after");
    let shownFailed = Number($("c-failed").textContent);
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
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();

  return { followJob };
})();
