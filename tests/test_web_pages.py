"""The dashboard in a real browser: Playwright driving Debian's chromium against a real web server, NATS,
Redis, a database, a worker subprocess and a processing service. Each test saves screenshots of the pages
it saw under its tmp dir (JETPIPE_SCREENSHOTS=DIR copies the job page's to DIR/job-page.png)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from models import Job, JobStatus
from pipeline.ops.devstack import free_port
from pipeline.sdk import moth
from tests.conftest import PROJECT, subprocess_env, wait_for
from tests.helpers import (
    dispatch,
    error_body,
    fake_job,
    handle_result_message,
    job_with_results,
    pull_tasks,
    success_body,
)
from tests.web_helpers import TOKENS, TOKENS_SETTING, WebServer

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of Cancel and Retry
    page.shots = tmp_path
    refused = []  # what the pages' Content-Security-Policy blocked: nothing of jetpipe's own may be
    page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text
            else None)
    yield page
    context.close()
    assert not refused, refused


def shot(page, name: str) -> Path:
    page.wait_for_timeout(600)  # the bars' width transitions end
    path = page.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def web(settings, runtime):
    server = WebServer(settings, runtime).start()  # no tokens: an operator on this machine
    yield server
    server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_created_from_the_page_reaches_success_while_the_page_updates(
        page, web, settings, moth_pipeline, trap_images, worker_factory, service_factory):
    worker_factory(settings)
    slow = lambda task: (time.sleep(0.15), moth.process_task(task))[1]  # noqa: E731 - a job to watch move
    service_factory(settings, moth.SLUG, slow, concurrency=2)
    directory, truth = trap_images
    names = sorted(truth)[:30]
    page.goto(web.url + "/")
    shot(page, "jobs-empty")
    page.select_option("#new-job select[name=pipeline]", moth.SLUG)
    page.fill("#new-job input[name=name]", "night from the page")
    page.fill("#new-job textarea[name=urls]", "\n".join(f"file://{directory}/{n}" for n in names))
    page.click("#new-job button")
    page.wait_for_url("**/jobs/*")
    page.evaluate("window.__same_page = true")  # gone if the page reloads
    # the counters move while we look, without a reload
    page.wait_for_function("() => { const n = Number(document.getElementById('c-processed').textContent);"
                           " return n > 0 && n < 30 }", timeout=60_000)
    shot(page, "job-running")
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'SUCCESS'", timeout=90_000)
    assert page.evaluate("window.__same_page") is True
    assert page.inner_text("#c-processed") == "30" and page.inner_text("#c-failed") == "0"
    assert page.inner_text("#c-detections") == str(sum(len(truth[n]) for n in names))
    assert "100%" in page.inner_text("#stage-results")
    page.wait_for_function("() => document.querySelectorAll('#chart polyline.settled').length === 1")
    assert "30 of 30" in page.inner_text("#chart-caption")
    assert page.evaluate("document.getElementById('bar-results').style.width") == "100%"
    page.wait_for_function("() => document.getElementById('log').textContent.includes('job finished SUCCESS')")
    job_shot = shot(page, "job-page")
    if os.environ.get("JETPIPE_SCREENSHOTS"):
        shutil.copy(job_shot, Path(os.environ["JETPIPE_SCREENSHOTS"]) / "job-page.png")
    # results download from the page
    with page.expect_download() as download:
        page.click("#download-csv")
    assert download.value.suggested_filename.endswith("-results.csv")
    # the job is in the list, with its status
    page.goto(web.url + "/?q=night")
    assert "night from the page" in page.inner_text("#jobs") and "SUCCESS" in page.inner_text("#jobs")
    shot(page, "jobs")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("lines", [300, 100_000])
def test_a_file_of_urls_uploaded_on_the_form_makes_a_job_of_every_line(page, web, moth_pipeline, tmp_path, lines):
    listing = tmp_path / "urls.txt"
    listing.write_text("# a night of the trap\n" + "".join(f"https://traps.example/night-3/{n:06}.jpg\n"
                                                          for n in range(lines)))
    page.goto(web.url + "/")
    page.select_option("#new-job select[name=pipeline]", moth.SLUG)
    page.fill("#new-job input[name=name]", f"{lines} from a file")
    page.set_input_files("#new-job input[name=urls_file]", str(listing))
    page.click("#new-job button")
    page.wait_for_url("**/jobs/*", timeout=120_000)
    job = Job.select().order_by(Job.id.desc()).first()
    assert (job.name, job.total_images) == (f"{lines} from a file", lines)
    assert page.url.endswith(f"/jobs/{job.id}")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refused_new_job_form_says_why_on_the_page_and_keeps_what_was_typed(page, web, moth_pipeline):
    page.goto(web.url + "/")
    page.fill("#new-job input[name=name]", "night 4")
    page.fill("#new-job input[name=project]", "lab-a")
    page.fill("#new-job textarea[name=urls]", "ftp://nowhere/a.png\nhttps://traps.example/b.jpg")
    page.click("#new-job button")
    page.wait_for_selector("#form-error")
    assert "not an image URL" in page.inner_text("#form-error") and "ftp://nowhere/a.png" in page.inner_text(
        "#form-error")
    assert page.input_value("#new-job input[name=name]") == "night 4"
    assert page.input_value("#new-job input[name=project]") == "lab-a"
    assert page.input_value("#new-job textarea[name=urls]") == "ftp://nowhere/a.png\nhttps://traps.example/b.jpg"
    assert Job.select().count() == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pasted_urls_past_the_old_one_megabyte_limit_make_a_job_from_the_form(page, web, moth_pipeline):
    page.goto(web.url + "/")
    page.select_option("#new-job select[name=pipeline]", moth.SLUG)
    urls = "\n".join(f"https://traps.example/night-4/{n:06}.jpg" for n in range(30_000))  # 1.2 MB: was refused
    page.evaluate("text => { document.querySelector('#new-job textarea[name=urls]').value = text }", urls)
    page.click("#new-job button")
    page.wait_for_url("**/jobs/*", timeout=120_000)
    assert Job.select().order_by(Job.id.desc()).first().total_images == 30_000


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_api_docs_render_with_no_network_beyond_this_server(page, web):
    outside = []

    def only_this_server(route):
        if route.request.url.startswith(web.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.context.route("**/*", only_this_server)
    page.goto(web.url + "/api/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "jetpipe" in page.inner_text(".swagger-ui .info .title")
    page.locator(".opblock-summary-path", has_text="/api/v1/jobs/bulk").first.wait_for()  # the operations are listed
    assert outside == []
    shot(page, "api-docs")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_failure_reasons_are_shown_literally_and_retry_makes_a_new_job(page, web, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 3, name="<i>night</i> [bold]3[/bold]")
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 3)
    hostile = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'> [red]rich[/red] &amp;"
    handle_result_message(runtime, job.id, success_body(tasks[0][0]), tasks[0][1], tasks[0][0].task_token)
    for task, reply in tasks[1:]:
        handle_result_message(runtime, job.id, error_body(task.image_id, hostile), reply, task.task_token)
    assert Job.get_by_id(job.id).status == JobStatus.FAILURE
    page.goto(f"{web.url}/jobs/{job.id}")
    page.wait_for_function("() => document.getElementById('log').textContent.length > 0")
    reasons = page.locator("#failures td.reason").all_inner_texts()
    assert reasons == [f"processing service error: {hostile}"] * 2
    assert page.inner_text("#job-name") == "<i>night</i> [bold]3[/bold]"
    assert page.evaluate("window.__pwned") is None
    shot(page, "job-failures")
    page.click("#retry")
    page.wait_for_url(lambda url: not url.endswith(f"/jobs/{job.id}"))
    retry = Job.select().order_by(Job.id.desc()).first()
    assert retry.id != job.id and retry.total_images == 2 and page.url.endswith(f"/jobs/{retry.id}")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cancel_turns_a_running_job_revoked(page, web, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)  # nobody processes it: it runs until cancelled
    page.goto(f"{web.url}/jobs/{job.id}")
    assert page.inner_text("#job-status") == "STARTED"
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'REVOKED'")
    assert Job.get_by_id(job.id).status == JobStatus.REVOKED
    assert page.is_hidden("#cancel-form")
    shot(page, "job-cancelled")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pause_and_resume_from_the_job_page_show_the_reason_literally(page, web, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 4, project="lab-a", priority="high")
    dispatch(runtime, job.id)
    page.goto(f"{web.url}/jobs/{job.id}")
    assert page.inner_text("#job-project") == "lab-a" and page.inner_text("#job-priority") == "high"
    assert page.is_hidden("#job-paused") and page.is_hidden("#resume-form")
    page.fill("#pause-form input[name=reason]", "<b>GPU</b> swap")
    page.click("#pause")
    page.wait_for_selector("#job-paused", state="visible")
    assert "<b>GPU</b> swap" in page.inner_text("#job-paused")
    assert Job.get_by_id(job.id).paused_at is not None and page.is_hidden("#pause-form")
    shot(page, "job-paused")
    page.click("#resume")
    page.wait_for_selector("#job-paused", state="hidden")
    assert Job.get_by_id(job.id).paused_at is None and page.is_visible("#pause-form")
    assert pull_tasks(runtime, job.id, 4)  # its tasks go out again


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_bulk_action_lists_the_jobs_then_acts_on_those_confirmed(page, web, runtime, moth_pipeline):
    jobs = [fake_job(moth_pipeline, 2, project=project, name=f"night {n}")
            for n, project in enumerate(["lab-a", "lab-b", "lab-b"])]
    for job in jobs:
        dispatch(runtime, job.id)
    page.goto(f"{web.url}/")
    page.click("#bulk-link")
    page.select_option("#bulk-filter select[name=action]", "pause")
    page.select_option("#bulk-filter select[name=project]", "lab-b")
    page.click("#bulk-preview")
    page.wait_for_selector("#bulk-plan")
    listed = page.locator("#bulk-plan tbody tr td:first-child").all_inner_texts()
    assert listed == [str(jobs[1].id), str(jobs[2].id)]
    assert all(Job.get_by_id(j.id).paused_at is None for j in jobs)  # nothing changed yet
    shot(page, "bulk-plan")
    late = fake_job(moth_pipeline, 2, project="lab-b", name="came after the list")
    dispatch(runtime, late.id)
    page.click("#bulk-apply")  # the confirmation dialog is accepted
    page.wait_for_selector("#bulk-done")
    assert "2 of 2 job(s) changed" in page.inner_text("#done-title")
    assert [Job.get_by_id(j.id).paused_at is not None for j in jobs] == [False, True, True]
    assert Job.get_by_id(late.id).paused_at is None  # only what was shown and confirmed
    shot(page, "bulk-done")
    page.goto(f"{web.url}/?project=lab-b")
    assert page.locator("#jobs tbody tr").count() == 3 and page.locator("#jobs .badge.paused").count() == 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_health_page_turns_red_when_nats_is_stopped(page, private_runtime):
    runtime, dev = private_runtime
    server = WebServer(runtime.settings, runtime).start()
    try:
        page.goto(server.url + "/health")
        assert page.inner_text("#health-status") in ("healthy", "degraded")
        shot(page, "health")
        dev.nats.stop()
        page.wait_for_function("() => document.getElementById('health-status').textContent === 'unreachable'",
                               timeout=30_000)
        badge = page.locator("#health-status")
        assert "health-unreachable" in badge.get_attribute("class")
        color = badge.evaluate("el => getComputedStyle(el).backgroundColor")
        assert color == "rgb(198, 40, 40)", color  # red
        assert "bad" in page.locator("#dep-nats").get_attribute("class")
        shot(page, "health-red")
    finally:
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pages_need_a_login_when_tokens_are_configured_and_forms_are_csrf_safe(
        page, settings, runtime, moth_pipeline):
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    job = fake_job(moth_pipeline, 1)
    try:
        page.goto(f"{server.url}/jobs/{job.id}")
        assert page.url == f"{server.url}/login?next=/jobs/{job.id}"
        page.fill("input[name=token]", "wrong-token-0123456789")
        page.click("form.card button")
        assert "not known here" in page.inner_text("#login-failed")
        page.fill("input[name=token]", TOKENS["vic"][1])
        page.click("form.card button")
        page.wait_for_url(f"**/jobs/{job.id}")
        assert page.inner_text("header .who").startswith("vic (viewer)")
        assert page.locator("#cancel").count() == 0  # a viewer gets no operator buttons
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        assert not any(token in value for value in cookies.values() for _, token in TOKENS.values())
        shot(page, "viewer")
        # a form posted from elsewhere (no CSRF value) is refused, even with a valid session
        with httpx.Client(base_url=server.url, cookies=cookies) as client:
            forged = client.post(f"/jobs/{job.id}/cancel", data={}, headers={"Accept": "text/html"})
            assert forged.status_code == 403 and Job.get_by_id(job.id).status != JobStatus.REVOKED
            operator = client.post("/login", data={"token": TOKENS["ada"][1], "csrf": "x"},
                                   headers={"Accept": "text/html"})
            assert operator.status_code == 403  # the CSRF value must match the page's cookie
    finally:
        server.stop()


def test_cli_web_without_tokens_listens_on_this_machine_only(settings, tmp_path):
    port = free_port()
    env = subprocess_env(settings)
    proc = subprocess.Popen([sys.executable, "cli.py", "web", "--host", "0.0.0.0", "--port", str(port)],
                            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout_s=30, message="cli.py web")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["ready"] is True
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert "no PIPELINE_WEB_TOKENS: listening on 127.0.0.1 only, not 0.0.0.0" in err
    assert "Traceback" not in err


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_demo_web_keeps_the_dashboard_up_with_the_demo_job_until_ctrl_c(tmp_path):
    # (--http: its reference service works through the dashboard's HTTP gateway, not NATS)
    env = {"PATH": "/usr/bin:/bin", "PIPELINE_WEB_PORT": str(free_port()), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "cli.py", "demo", "--images", "8", "--web", "--http"], cwd=PROJECT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("dashboard: "):
                break
        assert any("works over HTTP through" in line for line in lines), "".join(lines)
        url = lines[-1].split()[1]
        assert url == f"http://127.0.0.1:{env['PIPELINE_WEB_PORT']}/jobs/1", "".join(lines)
        job = httpx.get(url.replace("/jobs/", "/api/v1/jobs/"), timeout=10).json()
        assert (job["status"], job["processed"]) == ("SUCCESS", 8)
        assert "demo job" in httpx.get(url, timeout=10, headers={"Accept": "text/html"}).text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + rest


def processes_of(root: str) -> list[int]:
    """The processes whose environment names `root` (the demo's directory: its database URL is in there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if root.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_web_stopped_by_sigterm_or_sighup_stops_everything_it_started(tmp_path, sig):
    env = {"PATH": "/usr/bin:/bin", "PIPELINE_WEB_PORT": str(free_port()), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "cli.py", "demo", "--images", "4", "--web"], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("dashboard: "):
                break
        root = next(line.split(" in ", 1)[1].strip() for line in lines if line.startswith("jetpipe demo in "))
        assert len(processes_of(root)) >= 3, "".join(lines)  # the worker (and its child), the service
        os.kill(proc.pid, sig)  # the demo process alone, as a service manager or a closed terminal would
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wait_for(lambda: not processes_of(root), timeout_s=20, message="every process of the demo to stop")
    servers = next(line for line in lines if line.startswith("NATS "))  # "NATS nats://h:p  Redis redis://h:p/0 …"
    for url in servers.split()[1], servers.split()[3]:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"{url} still answers"
    assert not Path(root).exists(), "".join(lines) + rest
    assert "Traceback" not in rest


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_page_on_another_local_origin_cannot_write_to_a_server_without_tokens(page, web, runtime, moth_pipeline,
                                                                                tmp_path):
    """Row 3 of the security review: in loopback mode a page served from another port of this machine
    cancelled a job and registered a pipeline (no Origin check, any content type, any Host). Now the
    browser's cross-origin writes are refused, whatever the kind of body, and nothing changes."""
    import http.server
    import threading

    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    attack = (f'<form id="f" method="post" action="{web.url}/api/v1/jobs/{job.id}/cancel"></form>'
              f"<script>fetch('{web.url}/api/v1/pipelines', {{method: 'POST', mode: 'no-cors', "
              "headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({slug: 'evil', name: 'E', "
              "algorithms: [{key: 'd', name: 'D', task_type: 'detection'}]})})"
              ".finally(() => document.getElementById('f').submit());</script>")
    (tmp_path / "attack.html").write_text(attack)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    other = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/attack.html")
        page.wait_for_url(f"{web.url}/api/v1/jobs/{job.id}/cancel", timeout=10_000)  # the form went
        assert "from another origin" in page.content()
    finally:
        other.shutdown()
    assert Job.get_by_id(job.id).status == JobStatus.STARTED
    from models import Pipeline

    assert not Pipeline.select().where(Pipeline.slug == "evil").exists()
    # DNS rebinding: a name that is not this machine's loopback reaches nothing, reads included
    rebound = httpx.get(f"{web.url}/api/v1/jobs", headers={"Host": f"evil.example:{web.port}"}, timeout=10)
    assert rebound.status_code == 400 and "is not this server" in rebound.json()["error"]


def test_a_login_cookie_is_signed_with_a_server_secret_dies_at_logout_and_is_secure_over_https(settings, runtime):
    """Row 8: the cookie's key was derived from the tokens alone (a cookie let its holder test token
    guesses offline), a cookie still worked after logout, and it had no Secure flag behind https."""
    import base64
    import hashlib
    import hmac
    import re

    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as browser:
            csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
            behind_https = httpx.post(f"{server.url}/login", data={"token": TOKENS["ada"][1], "csrf": csrf},
                                      cookies={"jetpipe_csrf": browser.cookies.get("jetpipe_csrf")},
                                      headers={"X-Forwarded-Proto": "https"}, timeout=10)
            assert behind_https.status_code == 303 and "secure" in behind_https.headers["set-cookie"].lower()
            login = browser.post("/login", data={"token": TOKENS["ada"][1], "csrf": csrf, "next": "/"})
            assert login.status_code == 303 and "secure" not in login.headers["set-cookie"].lower()
            cookie = browser.cookies.get("jetpipe_session")
            assert browser.get("/dlq").status_code == 200
            # the old key, from the tokens alone, forges nothing
            payload = f"ada:operator:{int(time.time()) + 3600}:x"
            old_key = hashlib.sha256(b"jetpipe-web-session\0" + "\n".join(sorted(
                t for _, t in TOKENS.values())).encode()).digest()
            forged = (base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=") + "." + base64.urlsafe_b64encode(
                hmac.new(old_key, payload.encode(), hashlib.sha256).digest()).decode().rstrip("="))
            assert httpx.get(f"{server.url}/dlq", cookies={"jetpipe_session": forged}, timeout=10,
                             follow_redirects=False).status_code == 303  # to the login form
            # logging out kills the cookie on the server: a copy of it no longer works
            assert browser.post("/logout", data={"csrf": csrf}).status_code == 303
            replayed = httpx.get(f"{server.url}/dlq", cookies={"jetpipe_session": cookie}, timeout=10,
                                 follow_redirects=False)
            assert replayed.status_code == 303
    finally:
        server.stop()


def serious_violations(page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}" for v in found
            if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_page_passes_an_accessibility_scan_in_light_and_dark(page, web, runtime, moth_pipeline):
    running = fake_job(moth_pipeline, 4, name="night 5", project="lab-a")
    dispatch(runtime, running.id)
    ended, _ = job_with_results(runtime, moth_pipeline, 3, 3)
    paths = ["/", f"/jobs/{running.id}", f"/jobs/{ended.id}", "/health", "/dlq", "/pipelines",
             "/bulk?action=pause&project=lab-a", "/jobs/999999"]
    found = {}
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        for path in paths:
            page.goto(web.url + path)
            page.wait_for_load_state("networkidle")
            if problems := serious_violations(page):
                found[f"{scheme} {path}"] = problems
    guarded = WebServer(runtime.settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:  # the login form, which only a server with tokens shows
        page.goto(guarded.url + "/login")
        if problems := serious_violations(page):
            found["/login"] = problems
    finally:
        guarded.stop()
    assert found == {}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_pages_fit_a_390_px_phone_without_sideways_scrolling(browser, web, runtime, moth_pipeline):
    job, _ = job_with_results(runtime, moth_pipeline, 3, 2)
    context = browser.new_context(viewport={"width": 390, "height": 844})
    phone = context.new_page()
    try:
        for path in ("/", f"/jobs/{job.id}", "/health", "/bulk"):
            phone.goto(web.url + path)
            phone.wait_for_load_state("networkidle")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{path} is {width} px wide"
    finally:
        context.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_row_of_the_jobs_list_follows_its_job_without_a_reload(page, web, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 4, name="night 6")
    dispatch(runtime, job.id)
    page.goto(web.url + "/")
    row = page.locator(f"#jobs tr[data-job='{job.id}']")
    assert row.locator(".progress-text").inner_text() == "0 / 4"
    page.evaluate("window.__same_page = true")
    for task, reply in pull_tasks(runtime, job.id, 4)[:3]:
        handle_result_message(runtime, job.id, success_body(task), reply, task.task_token)
    page.wait_for_function(f"() => document.querySelector(\"#jobs tr[data-job='{job.id}'] .progress-text\")"
                           ".textContent === '3 / 4'", timeout=15_000)
    assert page.evaluate("window.__same_page") is True
    assert row.locator("[role=progressbar]").get_attribute("aria-valuenow") == "75"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_taxon_table_equals_the_databases_counts(page, web, runtime, moth_pipeline):
    from models import Classification, Detection, JobImage

    job, tasks = job_with_results(runtime, moth_pipeline, 4, 3, boxes=3)
    page.goto(f"{web.url}/jobs/{job.id}")
    rows = [r.split("\t")[:2] for r in page.locator("#taxa tbody tr").all_inner_texts()]
    saved = (Classification.select().join(Detection).join(JobImage, on=(Detection.image == JobImage.image))
             .where((JobImage.job == job.id) & (Detection.bbox_key != "")).count())
    assert rows == [["Noctuidae", str(saved)]] and saved == 9


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_gallery_draws_each_saved_box_where_it_is_on_its_image(page, web, runtime, moth_pipeline, trap_images):
    from PIL import Image

    from models import Detection
    from pipeline.core.jobs import create_job
    from pipeline.core.manifests import Row

    directory, truth = trap_images
    names = sorted(truth)[:4]
    said = {"deployment": "pole 7", "timestamp": "2024-06-01T22:05:00+02:00", "note": "<i>moth</i> on the lens"}
    job = create_job(moth_pipeline, [Row(f"file://{directory}/{names[0]}", said)]
                     + [f"file://{directory}/{n}" for n in names[1:]], name="gallery")
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 4)
    for task, reply in tasks[:3]:
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    failed_task, failed_reply = tasks[3]
    handle_result_message(runtime, job.id, error_body(failed_task.image_id, "<b>lens</b> fogged"), failed_reply,
                          failed_task.task_token)
    page.goto(f"{web.url}/jobs/{job.id}")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure img[src^=\"blob:\"]').length === 4")
    width, height = Image.open(directory / names[0]).size
    task = tasks[0][0]
    figure = page.locator(f"#gallery figure[data-image='{task.image_id}']")
    assert figure.locator("svg").get_attribute("viewBox") == f"0 0 {width} {height}"
    drawn = sorted((float(r.get_attribute("x")), float(r.get_attribute("y")), float(r.get_attribute("width")),
                    float(r.get_attribute("height"))) for r in figure.locator("rect").all())
    saved = sorted((d.x1, d.y1, d.x2 - d.x1, d.y2 - d.y1) for d in Detection.select().where(
        (Detection.image == int(task.image_id)) & (Detection.bbox_key != "")))
    assert drawn == saved and len(saved) == 2
    assert figure.locator("figcaption").inner_text() == "Noctuidae 0.80"
    assert page.evaluate(f"document.querySelector(\"#gallery figure[data-image='{task.image_id}'] img\")"
                         ".naturalWidth") > 0
    shot(page, "gallery")
    # the full view: every box with its label, and a failure's reason shown literally
    figure.click()
    page.wait_for_selector("#viewer[open] #viewer-boxes text")
    assert page.locator("#viewer-boxes text").all_text_contents() == ["Noctuidae 0.80"] * 2
    # and what the manifest said of the image, literally
    assert page.locator("#viewer-metadata dt").all_text_contents() == ["deployment", "timestamp", "note"]
    assert page.locator("#viewer-metadata dd").all_text_contents() == [
        "pole 7", "2024-06-01T22:05:00+02:00", "<i>moth</i> on the lens"]
    page.click("#viewer-close")
    page.check("#gallery-filter input[name=failed]")
    page.click("#gallery-apply")
    page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1")
    assert page.inner_text("#gallery figcaption") == "failed: processing service error: <b>lens</b> fogged"
    page.locator("#gallery figure").click()
    assert page.inner_text("#viewer-error") == "processing service error: <b>lens</b> fogged"
