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

  // Progress over time: the job's samples ([unix seconds, settled, failed]) as lines in a 600 x 160 SVG.
  function drawChart(samples, total) {
    const svg = $("chart");
    if (!svg) return;
    svg.replaceChildren();
    const caption = $("chart-caption");
    if (samples.length < 2) {
      caption.textContent = "images settled over time: not enough samples yet";
      return;
    }
    const t0 = samples[0][0];
    const span = Math.max(samples[samples.length - 1][0] - t0, 1);
    const most = Math.max(total, 1);
    const line = (index, className) => {
      const path = document.createElementNS(SVG, "polyline");
      path.setAttribute("class", className);
      path.setAttribute("points", samples.map((s) => `${((s[0] - t0) / span) * 600},${160 - (s[index] / most) * 150}`)
        .join(" "));
      svg.append(path);
    };
    line(1, "settled");
    line(2, "failed");
    const last = samples[samples.length - 1];
    const minutes = span / 60;
    caption.textContent = `images settled over time: ${last[1].toLocaleString("en")} of ${total.toLocaleString("en")}`
      + ` (${last[2].toLocaleString("en")} failed) in ${minutes < 2 ? `${Math.round(span)} s` : `${Math.round(minutes)} min`}`
      + `, ${Math.round(last[1] / span).toLocaleString("en")} images/s on average`;
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
          drawChart(job.samples || [], job.total_images);
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

  // The gallery: a page of the job's images at a time, each thumbnail with its boxes drawn over it in the
  // original image's coordinates (the picture's X-Image-Size header gives that space).
  const SVG = "http://www.w3.org/2000/svg";
  async function loadPicture(url, img, svg) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    const [width, height] = (response.headers.get("X-Image-Size") || "0x0").split("x").map(Number);
    if (width && height) svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    img.src = URL.createObjectURL(await response.blob());
  }

  function drawBoxes(svg, detections, labels) {
    svg.replaceChildren();
    for (const d of detections) {
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(d.x1));
      rect.setAttribute("y", String(d.y1));
      rect.setAttribute("width", String(d.x2 - d.x1));
      rect.setAttribute("height", String(d.y2 - d.y1));
      svg.append(rect);
      if (labels && d.taxon) {
        const text = document.createElementNS(SVG, "text");
        text.setAttribute("x", String(d.x1));
        text.setAttribute("y", String(Math.max(d.y1 - 4, 12)));
        text.textContent = `${d.taxon} ${(d.taxon_score ?? 0).toFixed(2)}`;
        svg.append(text);
      }
    }
  }

  function openViewer(jobId, image) {
    const viewer = $("viewer");
    setText("viewer-title", `image ${image.image_id}: ${image.top_taxon || (image.status === "failed" ? "failed" : "nothing found")}`);
    const error = $("viewer-error");
    error.textContent = image.error || "";
    error.hidden = !image.error;
    const svg = $("viewer-boxes");
    drawBoxes(svg, image.detections, true);
    $("viewer-image").alt = image.url;
    loadPicture(`/api/v1/jobs/${jobId}/images/${image.image_id}/full`, $("viewer-image"), svg).catch(() => {});
    $("viewer-detections").tBodies[0].replaceChildren(...image.detections.map((d) => {
      const row = document.createElement("tr");
      row.append(cell(`${d.x1}, ${d.y1}, ${d.x2}, ${d.y2}`), cell((d.score ?? 0).toFixed(2), "num"),
                 cell(d.taxon || ""), cell(d.taxon_score == null ? "" : d.taxon_score.toFixed(2), "num"));
      return row;
    }));
    // what the job's manifest says of the image (deployment, timestamp, place, fields of its own), as text
    const meta = image.metadata || {};
    const facts = $("viewer-metadata");
    facts.replaceChildren(...Object.entries(meta).flatMap(([name, value]) => {
      const term = document.createElement("dt");
      term.textContent = name;
      const said = document.createElement("dd");
      said.textContent = String(value);
      return [term, said];
    }));
    facts.hidden = Object.keys(meta).length === 0;
    viewer.showModal();
  }

  function figureOf(jobId, image) {
    const figure = document.createElement("figure");
    figure.dataset.image = image.image_id;
    figure.tabIndex = 0;
    figure.setAttribute("role", "button");
    if (image.status === "failed") figure.classList.add("failed");
    const shot = document.createElement("div");
    shot.className = "shot";
    const img = document.createElement("img");
    img.alt = `image ${image.image_id}`;
    img.loading = "lazy";
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("preserveAspectRatio", "none");
    drawBoxes(svg, image.detections, false);
    shot.append(img, svg);
    const caption = document.createElement("figcaption");
    caption.textContent = image.status === "failed" ? `failed: ${image.error || ""}`
      : image.top_taxon ? `${image.top_taxon} ${(image.top_score ?? 0).toFixed(2)}`
        : image.status === "pending" ? "not yet processed" : "nothing found";
    figure.append(shot, caption);
    const open = () => openViewer(jobId, image);
    figure.addEventListener("click", open);
    figure.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") open(); });
    loadPicture(`/api/v1/jobs/${jobId}/images/${image.image_id}/thumbnail`, img, svg).catch(() => {
      img.alt = `image ${image.image_id}: cannot be shown`;
    });
    return figure;
  }

  function gallery(form) {
    const jobId = Number(form.dataset.jobId);
    const grid = $("gallery");
    const more = $("gallery-more");
    let after = 0;
    const load = async (fresh) => {
      const params = new URLSearchParams({ limit: "48", after: String(fresh ? 0 : after) });
      const data = new FormData(form);
      if (data.get("taxon")) params.set("taxon", data.get("taxon"));
      if (data.get("min_score")) params.set("min_score", data.get("min_score"));
      if (data.get("failed")) params.set("failed", "true");
      const page = await getJSON(`/api/v1/jobs/${jobId}/images?${params}`);
      const figures = page.images.map((image) => figureOf(jobId, image));
      if (fresh) grid.replaceChildren(...figures); else grid.append(...figures);
      if (fresh && !figures.length) {
        const empty = document.createElement("p");
        empty.className = "empty";
        empty.textContent = "no image matches";
        grid.append(empty);
      }
      after = page.next_after || 0;
      more.hidden = !page.next_after;
    };
    form.addEventListener("submit", (event) => { event.preventDefault(); load(true); });
    more.addEventListener("click", () => load(false));
    load(true);
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
    const chart = $("progress-chart");
    if (chart) drawChart(JSON.parse(chart.dataset.samples || "[]"), Number(chart.dataset.total));
    const pictures = $("gallery-filter");
    if (pictures) gallery(pictures);
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
