"""The JSON API against the real stack: a real web server (uvicorn), NATS, Redis, a database, a worker
subprocess and a processing service; an HTTP client like any other."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from models import Job, JobStatus
from pipeline.ops.export import export
from pipeline.sdk import moth
from tests.conftest import wait_for
from tests.helpers import dispatch, error_body, fake_job, pull_tasks, success_body
from tests.web_helpers import TOKENS, TOKENS_SETTING, WebServer, bearer


@pytest.fixture
def web(settings, runtime):
    """A web server with the test tokens on the test's database, NATS and Redis."""
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.server = server
        yield client
    server.stop()


def trap_urls(trap_images, n: int) -> list[str]:
    directory, truth = trap_images
    return [f"file://{directory}/{name}" for name in sorted(truth)[:n]]


@pytest.mark.slow
def test_a_job_created_through_the_api_reaches_success_and_exports_what_the_database_holds(
        web, settings, moth_pipeline, trap_images, worker_factory, service_factory):
    worker_factory(settings)
    service_factory(settings, moth.SLUG, moth.process_task)
    created = web.post("/api/v1/jobs", headers=bearer("ada"),
                       json={"pipeline": moth.SLUG, "urls": trap_urls(trap_images, 12), "name": "api night"})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["status"] == "PENDING" and created.json()["total_images"] == 12

    def finished():
        body = web.get(f"/api/v1/jobs/{job_id}", headers=bearer("vic")).json()
        return body if body["status"] in JobStatus.TERMINAL else None

    job = wait_for(finished, timeout_s=60, interval_s=0.3, message="the API's job to finish")
    directory, truth = trap_images
    expected = sum(len(truth[name]) for name in sorted(truth)[:12])
    assert (job["status"], job["processed"], job["failed"], job["detections"]) == ("SUCCESS", 12, 0, expected)
    # the export, both formats, is what the database holds
    for fmt in ("jsonl", "csv"):
        response = web.get(f"/api/v1/jobs/{job_id}/results", params={"format": fmt}, headers=bearer("vic"))
        assert response.status_code == 200
        assert response.text == "".join(export(job_id, fmt))
        assert f'filename="job-{job_id}-results.{fmt}"' in response.headers["content-disposition"]
    lines = [json.loads(line) for line in web.get(f"/api/v1/jobs/{job_id}/results", headers=bearer("vic")).text
             .splitlines()]
    assert sum(len(line["detections"]) for line in lines) == expected
    # and the listing shows it, with counts per status
    listing = web.get("/api/v1/jobs", params={"q": "api"}, headers=bearer("vic")).json()
    assert [j["id"] for j in listing["jobs"]] == [job_id] and listing["counts"]["SUCCESS"] == 1
    logs = web.get(f"/api/v1/jobs/{job_id}/logs", headers=bearer("vic")).json()
    assert any("job finished SUCCESS" in line["message"] for line in logs["lines"])


def test_operator_routes_need_an_operator_and_no_error_shows_a_token(web, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    routes = [("post", f"/api/v1/jobs/{job.id}/cancel", None), ("post", f"/api/v1/jobs/{job.id}/retry-failed", None),
              ("post", "/api/v1/jobs", {"pipeline": moth_pipeline, "urls": ["file:///x.png"]}),
              ("post", "/api/v1/dlq/replay", {"all": True}), ("post", "/api/v1/pipelines", moth.PIPELINE_SPEC)]
    for method, path, body in routes:
        anonymous = web.request(method, path, json=body)
        assert anonymous.status_code == 401 and anonymous.json() == {
            "error": "authentication required: send Authorization: Bearer <token>"}, path
        assert web.request(method, path, json=body, headers=bearer("vic")).status_code == 403, path
        assert web.request(method, path, json=body, headers=bearer("svc")).status_code == 403, path
    wrong = web.get("/api/v1/jobs", headers={"Authorization": "Bearer not-a-token-at-all"})
    assert wrong.status_code == 401
    # viewers read; the reference system's workers' "Token" scheme is accepted too
    assert web.get(f"/api/v1/jobs/{job.id}", headers=bearer("vic")).status_code == 200
    assert web.get("/api/v1/jobs", headers={"Authorization": f"Token {TOKENS['vic'][1]}"}).status_code == 200
    assert web.get("/api/v1/jobs", headers=bearer("svc")).status_code == 403  # gateway only
    # an operator may; no answer ever carries a token
    cancelled = web.post(f"/api/v1/jobs/{job.id}/cancel", headers=bearer("ada"))
    assert cancelled.json() == {"status": "REVOKED"}
    again = web.post(f"/api/v1/jobs/{job.id}/cancel", headers=bearer("ada")).json()
    assert again["nothing_to_do"] == f"job {job.id} already ended REVOKED: nothing to cancel"
    seen = " ".join(web.request(m, p, json=b, headers=bearer(who)).text
                    for m, p, b in routes for who in ("vic", "svc"))
    assert not any(token in seen for _, token in TOKENS.values())


def test_errors_are_json_with_the_status_that_says_why(web, moth_pipeline):
    ada = bearer("ada")
    assert web.get("/api/v1/jobs/4242", headers=ada).json() == {"error": "no job 4242"}
    assert web.get("/api/v1/jobs/4242", headers=ada).status_code == 404
    assert web.get("/api/v1/jobs/4242/results", headers=ada).status_code == 404
    bad_format = web.get("/api/v1/jobs/1/results", params={"format": "xml"}, headers=ada)
    assert bad_format.status_code == 400 and bad_format.json()["error"].startswith("bad request: format")
    no_urls = web.post("/api/v1/jobs", json={"pipeline": moth_pipeline, "urls": []}, headers=ada)
    assert (no_urls.status_code, no_urls.json()) == (400, {"error": "no images: the job would be empty"})
    bad_url = web.post("/api/v1/jobs", json={"pipeline": moth_pipeline, "urls": ["ftp://x/y.png"]}, headers=ada)
    assert bad_url.status_code == 400 and "not an image URL" in bad_url.json()["error"]
    unknown = web.post("/api/v1/jobs", json={"pipeline": "nope", "urls": ["file:///a.png"]}, headers=ada)
    assert unknown.status_code == 404 and "unknown pipeline 'nope'" in unknown.json()["error"]
    missing = web.post("/api/v1/jobs", json={"urls": ["file:///a.png"]}, headers=ada)
    assert missing.status_code == 400 and "pipeline" in missing.json()["error"]
    not_json = web.post("/api/v1/pipelines", content=b"{nope", headers=ada)
    assert not_json.status_code == 400 and "error" in not_json.json()
    assert Job.select().count() == 0  # nothing was created by any of that


def test_retry_failed_pipelines_and_dead_letters_through_the_api(web, runtime, moth_pipeline, tmp_path):
    ada = bearer("ada")
    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    from tests.helpers import handle_result_message

    tasks = pull_tasks(runtime, job.id, 3)
    handle_result_message(runtime, job.id, success_body(tasks[0][0]), tasks[0][1], tasks[0][0].task_token)
    for task, reply in tasks[1:]:
        handle_result_message(runtime, job.id, error_body(task.image_id, "<b>lens</b> [red]cap[/red]"), reply,
                              task.task_token)
    failures = web.get(f"/api/v1/jobs/{job.id}/failures", headers=ada).json()["failures"]
    assert [f["error"] for f in failures] == ["processing service error: <b>lens</b> [red]cap[/red]"] * 2
    retry = web.post(f"/api/v1/jobs/{job.id}/retry-failed", headers=ada)
    assert retry.status_code == 201 and retry.json()["total_images"] == 2 and retry.json()["retry_of"] == job.id
    # a file of URLs, uploaded
    upload = web.post("/api/v1/jobs/from-file", headers=ada, data={"pipeline": moth_pipeline, "name": "from file"},
                      files={"urls_file": ("urls.txt", b"# night 3\nfile:///t/1.png\n\n/t/2.png\n")})
    assert upload.status_code == 201, upload.text
    assert upload.json()["total_images"] == 2
    binary = web.post("/api/v1/jobs/from-file", headers=ada, data={"pipeline": moth_pipeline, "name": "binary"},
                      files={"urls_file": ("urls.bin", b"file:///t/3.png\n\xff\xfe\x00")})
    assert (binary.status_code, binary.json()) == (400, {"error": "urls.bin is not UTF-8 text"})
    assert Job.select().where(Job.name == "binary").count() == 0  # nothing of it was created
    # pipelines: register and list
    spec = {"slug": "bees", "name": "Bees", "algorithms": [{"key": "b1", "name": "B", "task_type": "detection"}]}
    assert web.post("/api/v1/pipelines", json=spec, headers=ada).status_code == 201
    assert web.post("/api/v1/pipelines", json=spec, headers=ada).status_code == 200  # updated, not created
    slugs = [p["slug"] for p in web.get("/api/v1/pipelines", headers=ada).json()["pipelines"]]
    assert slugs == ["bees", moth_pipeline]
    assert web.get("/api/v1/dlq", headers=ada).json() == {"messages": []}
    assert web.post("/api/v1/dlq/replay", json={}, headers=ada).status_code == 400
    assert web.get("/api/v1/openapi.json", headers=bearer("vic")).status_code == 200


def test_the_api_description_and_its_documentation_need_a_reader_when_tokens_are_set(web):
    assert web.get("/api/v1/openapi.json").status_code == 401
    assert web.get("/api/docs", follow_redirects=False).status_code == 303  # to the login form
    assert web.get("/api/v1/openapi.json", headers=bearer("svc")).status_code == 403  # a service only uses the gateway
    schema = web.get("/api/v1/openapi.json", headers=bearer("vic")).json()
    assert "/api/v2/jobs/{job_id}/result/" in schema["paths"]
    docs = web.get("/api/docs", headers=bearer("vic"))
    assert docs.status_code == 200 and "/api/v1/openapi.json" in docs.text
    policy = docs.headers["content-security-policy"]  # that page's own: its inline start, no outside origin
    assert "'unsafe-inline'" in policy and "http" not in policy and "/static/api-docs/swagger-ui-bundle.js" in docs.text
    assert web.get("/static/api-docs/swagger-ui-bundle.js").status_code == 200


def test_healthz_stays_up_and_readyz_follows_nats(private_runtime):
    runtime, dev = private_runtime
    server = WebServer(runtime.settings, runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            dev.nats.stop()
            started = time.monotonic()
            down = client.get("/readyz")
            assert down.status_code == 503 and down.json()["nats"].startswith("cannot connect to NATS")
            assert down.json()["database"] == down.json()["redis"] == "ok"
            assert time.monotonic() - started < 10
            assert client.get("/healthz").status_code == 200
            dev.nats.start()
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=30, message="readyz to recover")
    finally:
        server.stop()


def test_without_tokens_everyone_on_this_machine_is_an_operator(settings, runtime, moth_pipeline):
    assert settings.web_tokens == ""
    server = WebServer(settings, runtime).start()  # (cli.py web binds it to 127.0.0.1: tests/test_web_pages.py)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/api/v1/jobs").status_code == 200
            created = client.post("/api/v1/jobs", json={"pipeline": moth_pipeline, "urls": ["file:///a.png"]})
            assert created.status_code == 201
    finally:
        server.stop()


def test_a_bug_is_a_json_500_without_its_details(web, monkeypatch, caplog):
    def broken():
        raise ValueError("secret internals")

    monkeypatch.setattr("pipeline.web.api.list_pipelines", broken)
    response = web.get("/api/v1/pipelines", headers=bearer("vic"))
    assert (response.status_code, response.json()) == (500, {"error": "internal error (see the server's log)"})
    assert "secret internals" not in response.text and "secret internals" in caplog.text


def test_every_answer_carries_the_security_headers(web):
    for path in ("/", "/api/v1/health", "/api/v1/jobs/4242", "/static/style.css"):
        headers = web.get(path).headers
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy, path
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy, path  # no inline script anywhere


def _first_answer(url: str, request: bytes, timeout_s: float = 5.0) -> str:
    """The status line the server sends back to `request` (headers only: the body is never sent), or ''
    if it waits for the body instead of answering."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        try:
            return sock.recv(200).decode("latin-1").split("\r\n", 1)[0]
        except TimeoutError:
            return ""


def test_a_write_is_refused_before_its_body_is_read(web):
    """300 MB announced by someone without credentials: 401 at once, before a byte of the body; a body over
    the limit, with credentials: 413 at once. (Before: the server read it all, then answered.)"""
    huge = 300 * 1024 * 1024
    anonymous = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {huge // 1000}\r\n\r\n").encode()  # under the limit: the 401 is auth's
    assert _first_answer(str(web.base_url), anonymous) == "HTTP/1.1 401 Unauthorized"
    token = bearer("ada")["Authorization"]
    oversized = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {huge}\r\n\r\n").encode()
    assert _first_answer(str(web.base_url), oversized) == "HTTP/1.1 413 Request Entity Too Large"
    # streamed without a length, it is cut off as it grows past the limit
    def chunks():
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    streamed = web.post("/api/v1/jobs", content=chunks(), headers={**bearer("ada"), "Content-Type": "application/json"})
    assert streamed.status_code == 413 and "PIPELINE_WEB_MAX_BODY_MB" in streamed.json()["error"]


def test_an_api_write_with_the_login_cookie_needs_the_csrf_value(web, runtime, moth_pipeline):
    """Row 10: with tokens, an API write authenticated by the session cookie alone (what a browser sends to
    any site's request) is refused without the CSRF value; a token, or the cookie with it, is fine."""
    import re

    from pipeline.web.auth import CSRF_COOKIE, SESSION_COOKIE

    job = fake_job(moth_pipeline, 1)
    with httpx.Client(base_url=str(web.base_url), timeout=10, follow_redirects=False) as browser:  # log in
        csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
        assert browser.post("/login", data={"token": TOKENS["ada"][1], "csrf": csrf}).status_code == 303
        session = browser.cookies.get(SESSION_COOKIE)
    cookies = {SESSION_COOKIE: session, CSRF_COOKIE: "a-csrf-value-of-this-browser"}
    refused = httpx.post(f"{web.base_url}/api/v1/jobs/{job.id}/cancel", cookies=cookies, timeout=10)
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["error"]
    assert Job.get_by_id(job.id).status != JobStatus.REVOKED
    done = httpx.post(f"{web.base_url}/api/v1/jobs/{job.id}/cancel", cookies=cookies, timeout=10,
                      headers={"X-CSRF-Token": "a-csrf-value-of-this-browser"})
    assert done.status_code == 200, done.text


def test_token_guessing_is_throttled_per_address_and_logged(web, caplog):
    """Row 9: 400 wrong Bearer guesses went through in 0.8 s. Now ten a minute from one address, then 429
    with Retry-After (and a log line), for every request of that address, good token or not."""
    import logging

    with caplog.at_level(logging.WARNING, logger="pipeline.web.guard"):
        answers = [web.get("/api/v1/jobs", headers={"Authorization": f"Bearer guess-{n:012d}"}).status_code
                   for n in range(12)]
    assert answers[:10] == [401] * 10 and answers[10:] == [429, 429]
    locked = web.get("/api/v1/jobs", headers=bearer("ada"))
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert "failed to authenticate 10 times" in caplog.text
