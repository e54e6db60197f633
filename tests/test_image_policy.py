"""Which images jetpipe reads (issue 25, row 6): local files only under PIPELINE_IMAGE_ROOTS (and, without
roots, only from the CLI on jetpipe's own machine), remote images only from PIPELINE_IMAGE_HOSTS when set;
and a failure that says nothing of what exists. Real web server, worker path and files."""

from __future__ import annotations

import http.server
import os
import shutil
import threading

import httpx
import pytest

from models import Job, JobImage
from pipeline.core.image_policy import ImagePolicy
from pipeline.core.jobs import create_job
from pipeline.errors import UserInputError
from pipeline.ops.devstack import free_port
from pipeline.sdk import moth
from pipeline.settings import set_settings
from pipeline.web.server import BackgroundWebServer
from tests.helpers import dispatch


@pytest.fixture
def web_with(settings, runtime):
    """A web server (no tokens: an operator on this machine) with the given settings overrides."""
    started = []

    def start(**overrides):
        overrides.setdefault("image_roots", "")
        server = BackgroundWebServer(settings.with_overrides(**overrides), runtime, port=free_port()).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def post_job(server, urls: list[str]) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/jobs", json={"pipeline": moth.SLUG, "urls": urls}, timeout=30)


def test_jobs_made_over_the_network_name_local_files_only_under_the_image_roots(web_with, moth_pipeline, tmp_path,
                                                                                 trap_images):
    traps, truth = trap_images
    directory = tmp_path / "roots"
    directory.mkdir()
    shutil.copy(traps / sorted(truth)[0], directory / "trap.png")
    inside = f"file://{directory}/trap.png"
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    os.symlink(outside, directory / "escape.png")
    # Without roots: no local file through the API, whatever it is; nothing is created
    refused = post_job(web_with(), [inside])
    assert refused.status_code == 400 and "PIPELINE_IMAGE_ROOTS is not set" in refused.json()["error"]
    assert Job.select().count() == 0
    # With roots: a file under them is taken; one outside, one reached by `..`, one behind a symbolic link
    # that leads out, are refused, and the answer is the same whether the file exists or not
    server = web_with(image_roots=str(directory))
    assert post_job(server, [inside]).status_code == 201
    for url in (f"file://{outside}", f"file://{directory}/../{outside.name}", f"file://{directory}/escape.png",
                "file:///etc/shadow", "file:///etc/no-such-file"):
        answer = post_job(server, [url])
        assert answer.status_code == 400 and "is outside the image roots" in answer.json()["error"], url
    assert Job.select().count() == 1


def test_the_cli_on_jetpipes_own_machine_may_name_local_files_without_roots(settings, moth_pipeline, trap_images):
    directory, truth = trap_images
    assert create_job(moth.SLUG, [f"file://{directory}/{sorted(truth)[0]}"]).total_images == 1
    # and with roots set, the CLI is held to them too
    set_settings(settings.with_overrides(image_roots=str(directory / "sub")))
    with pytest.raises(UserInputError, match="outside the image roots"):
        create_job(moth.SLUG, [f"file://{directory}/{sorted(truth)[0]}"])


def test_remote_images_come_only_from_the_allowed_hosts(web_with, moth_pipeline):
    server = web_with(image_hosts="images.example, cdn.example")
    assert post_job(server, ["https://images.example/a.jpg", "https://CDN.example/b.jpg"]).status_code == 201
    refused = post_job(server, ["https://images.example/c.jpg", "http://169.254.169.254/latest/meta-data"])
    assert refused.status_code == 400 and "'169.254.169.254' is not one of PIPELINE_IMAGE_HOSTS" in \
        refused.json()["error"]
    assert post_job(server, ["ftp://images.example/a.jpg"]).status_code == 400  # http(s) and file only


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the standard library's name
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_image_that_cannot_be_read_fails_the_same_way_whatever_the_reason(runtime, moth_pipeline, tmp_path):
    # Given images that cannot be read for different reasons: a missing file, a directory, a closed port, a
    # server that answers 401
    server = http.server.HTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = [f"file://{tmp_path}/missing.png", f"file://{tmp_path}", f"http://127.0.0.1:{free_port()}/a.png",
                f"http://127.0.0.1:{server.server_port}/secret.png"]
        job = create_job(moth.SLUG, urls, dispatch_mode="internal")
        dispatch(runtime, job.id)
    finally:
        server.shutdown()
    # Then each fails with the same words: nothing tells its reader what exists where
    errors = {row.error for row in JobImage.select().where(JobImage.job == job.id)}
    assert errors == {"processing service error: ImageUnreadable: cannot read the image"}


def test_the_worker_reads_no_local_file_outside_the_roots_even_of_an_older_job(runtime, moth_pipeline, trap_images):
    # Given an internal job made before the roots were set, over a real image
    directory, truth = trap_images
    job = create_job(moth.SLUG, [f"file://{directory}/{sorted(truth)[0]}"], dispatch_mode="internal")
    # When the worker runs it with roots that do not hold the image
    runtime.settings = runtime.settings.with_overrides(image_roots=str(directory / "elsewhere"))
    dispatch(runtime, job.id)
    # Then the image is not read
    row = JobImage.get(JobImage.job == job.id)
    assert (row.status, row.error) == ("failed", "processing service error: ImageUnreadable: cannot read the image")


def test_checking_a_jobs_urls_resolves_each_directory_once_and_still_follows_every_link(tmp_path):
    # (creating a job of a million local images must not resolve a million whole paths)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "out.png").write_bytes(b"x")
    os.symlink(tmp_path / "out.png", root / "link.png")
    os.symlink(tmp_path, root / "up")
    policy = ImagePolicy((os.path.realpath(root),))
    dirs: dict[str, str] = {}
    cases = {"a.png": True, "sub/../a.png": True, "../out.png": False, "link.png": False, "up/out.png": False,
             "sub/..": True, "up/in/a.png": True}
    for relative, expected in cases.items():
        path = f"{root}/{relative}"
        assert policy.local_path_allowed(path, dirs=dirs) is policy.local_path_allowed(path) is expected, relative
    dirs.clear()
    assert all(policy.local_path_allowed(f"{root}/sub/img-{i}.png", dirs=dirs) for i in range(1000))
    assert list(dirs) == [f"{root}/sub"]  # a thousand files, one directory resolved
