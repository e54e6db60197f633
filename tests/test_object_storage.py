"""Images in S3-compatible object storage (pipeline/infra/objectstore.py), on a real S3-API server the tests start
(moto's standalone server, on a free port): a job from a prefix, presigned URLs handed to services that hold
no credentials, an object that is missing, a URL refused, and bad input; no credential anywhere."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.config import Config

from models import Job, JobImage, JobLog, JobStatus, SourceImage
from pipeline import names
from pipeline.core.jobs import create_job
from pipeline.errors import ConfigError, UserInputError
from pipeline.infra import objectstore
from pipeline.ops.devstack import free_port
from pipeline.sdk import moth
from pipeline.sdk.handlers import get_handler
from pipeline.settings import Settings, set_settings
from tests.conftest import PROJECT, kill_group, subprocess_env, wait_for
from tests.helpers import dispatch, nats_client, take_and_save
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

ACCESS_KEY = "AKIAJETPIPETEST00001"
SECRET_KEY = "jetpipe-test-secret-key-Qm7vXw2sLk9p"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory):
    """An S3-API server (moto's standalone mode) on a free port, with the test's credentials in this process."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    kill_group(proc)
    log.close()


@pytest.fixture
def bucket(s3_url, request):
    """A fresh bucket with `traps/night-1/` holding 12 trap images and 2 files that are not images, and one
    image elsewhere: (its name, boto3 client)."""
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    name = f"traps-{abs(hash(request.node.nodeid)) % 10**8}"
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture
def s3_settings(settings, s3_url):
    hooked = settings.with_overrides(s3_endpoint_url=s3_url)
    set_settings(hooked)
    return hooked


def pngs(images) -> list:
    return sorted(images[0].glob("*.png"))


def upload(client, bucket: str, images, count: int = 12) -> list[str]:
    """`count` trap images under night-1/, two files there that are not images, and an image under night-2/."""
    keys = []
    for path in pngs(images)[:count]:
        keys.append(f"night-1/{path.name}")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="night-1/notes.txt", Body=b"not an image")
    client.put_object(Bucket=bucket, Key="night-1/sub/readme.md", Body=b"# not an image")
    client.put_object(Bucket=bucket, Key="night-2/other.png", Body=pngs(images)[-1].read_bytes())
    return keys


def test_a_prefix_lists_its_images_a_page_at_a_time_and_nothing_else(s3_settings, bucket, trap_images):
    name, client = bucket
    keys = upload(client, name, trap_images)
    listed = list(objectstore.list_images(f"s3://{name}/night-1/", s3_settings, suffixes=(".png",)))
    assert listed == [f"s3://{name}/{k}" for k in sorted(keys)]
    assert list(objectstore.list_images(f"s3://{name}/night-1/", s3_settings, suffixes=(".md",))) == [
        f"s3://{name}/night-1/sub/readme.md"]
    with pytest.raises(UserInputError, match="no bucket 'nope-bucket'"):
        list(objectstore.list_images("s3://nope-bucket/x/", s3_settings, suffixes=(".png",)))


def test_a_job_from_a_prefix_hands_services_presigned_urls_that_outlive_the_lease(s3_settings, runtime, bucket,
                                                                                 moth_pipeline, trap_images):
    name, client = bucket
    upload(client, name, trap_images, count=3)
    job = create_job(moth_pipeline, [f"s3://{name}/night-1/"])
    assert job.total_images == 3  # the two files that are not images are not part of it
    assert {u for (u,) in SourceImage.select(SourceImage.url).join(JobImage).where(JobImage.job == job.id).tuples()
            } == {f"s3://{name}/night-1/{p.name}" for p in pngs(trap_images)[:3]}
    dispatch(runtime, job.id)

    async def task_urls() -> list[str]:
        async with nats_client(runtime.settings.nats_url) as nc:
            js = nc.jetstream()
            info = await js.stream_info(names.tasks_stream(moth_pipeline))
            return [json.loads((await js.get_msg(names.tasks_stream(moth_pipeline), seq)).data)["image_url"]
                    for seq in range(info.state.first_seq, info.state.last_seq + 1)]

    urls = runtime.runner.run(task_urls(), timeout=20)
    assert len(urls) == 3
    for url in urls:
        query = parse_qs(urlsplit(url).query)
        assert url.startswith(f"{s3_settings.s3_endpoint_url}/{name}/night-1/") and query["X-Amz-Signature"]
        lease = s3_settings.nats_task_ttr * s3_settings.nats_max_deliver
        assert int(query["X-Amz-Expires"][0]) == s3_settings.s3_url_ttl_s >= lease + 300
        assert SECRET_KEY not in url
        assert httpx.get(url, timeout=10).content[:4] == b"\x89PNG"  # anyone holding it may read that object


def test_a_missing_object_fails_its_image_saying_so(s3_settings, runtime, bucket, moth_pipeline, trap_images,
                                                   service_factory, monkeypatch):
    name, client = bucket
    upload(client, name, trap_images, count=2)
    first = pngs(trap_images)[0].name
    job = create_job(moth_pipeline, [f"s3://{name}/night-1/{first}", f"s3://{name}/night-1/gone.png"])
    dispatch(runtime, job.id)
    service_factory(s3_settings, moth_pipeline, get_handler(moth_pipeline))  # holds no credential of its own
    take_and_save(runtime, job.id, monkeypatch)
    reasons = {url.rsplit("/", 1)[1]: (status, error) for status, error, url in JobImage.select(
        JobImage.status, JobImage.error, SourceImage.url).join(SourceImage).where(JobImage.job == job.id).tuples()}
    assert reasons["gone.png"] == ("failed", "processing service error: ImageUnreadable: cannot read the image: the "
                                             "object storage answered 404 NoSuchKey (the object does not exist)")
    assert reasons[first][0] == "processed"


def test_a_refused_or_expired_url_says_what_the_object_storage_answered():
    class S3Refusal(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b"<Message>Request has expired</Message><X-Amz-Expires>60</X-Amz-Expires></Error>")
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), S3Refusal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        signed = (f"http://127.0.0.1:{server.server_port}/traps/night-1/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                  "&X-Amz-Expires=60&X-Amz-Signature=abc123")
        with pytest.raises(moth.ImageUnreadable, match="the object storage answered 403 AccessDenied "
                                                       r"\(Request has expired\)"):
            moth.load_image(signed)
        # an URL that is not a presigned one keeps the plain reason: nothing about somebody else's server
        with pytest.raises(moth.ImageUnreadable) as plain:
            moth.load_image(signed.split("?")[0])
        assert str(plain.value) == "cannot read the image"
    finally:
        server.shutdown()
        server.server_close()


def test_the_web_api_reads_only_the_buckets_the_operator_names(s3_settings, runtime, bucket, moth_pipeline,
                                                              trap_images):
    name, client = bucket
    upload(client, name, trap_images, count=2)
    body = {"pipeline": moth_pipeline, "urls": [f"s3://{name}/night-1/"]}
    for buckets, expected in (("", "may read object storage only from the buckets of PIPELINE_S3_BUCKETS"),
                              ("someone-else", f"bucket '{name}' is not one of PIPELINE_S3_BUCKETS")):
        server = WebServer(s3_settings.with_overrides(web_tokens=TOKENS_SETTING, s3_buckets=buckets), runtime).start()
        try:
            refused = httpx.post(f"{server.url}/api/v1/jobs", json=body, headers=bearer("ada"), timeout=30)
        finally:
            server.stop()
        assert refused.status_code == 400 and expected in refused.json()["error"]
        assert Job.select().count() == 0
    server = WebServer(s3_settings.with_overrides(web_tokens=TOKENS_SETTING, s3_buckets=name), runtime).start()
    try:
        made = httpx.post(f"{server.url}/api/v1/jobs", json={**body, "suffixes": ["png"]}, headers=bearer("ada"),
                          timeout=30)
        assert made.status_code == 201, made.text
        assert made.json()["total_images"] == 2 and SECRET_KEY not in made.text and ACCESS_KEY not in made.text
    finally:
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_from_the_command_line_a_prefix_runs_to_success_and_no_credential_is_written_anywhere(
        s3_settings, bucket, moth_pipeline, trap_images, worker_factory, tmp_path):
    name, client = bucket
    upload(client, name, trap_images, count=12)
    env = subprocess_env(s3_settings, **CREDENTIALS)
    worker_factory(s3_settings, threads=2, **CREDENTIALS)
    service_log = open(tmp_path / "service.log", "ab")
    # the processing service gets NATS and nothing else: no credential of the object storage
    service = subprocess.Popen([sys.executable, "cli.py", "process", "--pipeline", moth_pipeline], cwd=PROJECT,
                               env={k: v for k, v in subprocess_env(s3_settings).items() if not k.startswith("AWS_")},
                               stdout=service_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        made = subprocess.run([sys.executable, "cli.py", "-v", "enqueue-job", "--pipeline", moth_pipeline,
                               "--images", f"s3://{name}/night-1", "--json"], cwd=PROJECT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        job_id = json.loads(made.stdout)["id"]
        wait_for(lambda: Job.get_by_id(job_id).status in JobStatus.TERMINAL, timeout_s=90, message="the job to end")
        status = subprocess.run([sys.executable, "cli.py", "status", str(job_id), "--json"], cwd=PROJECT, env=env,
                                capture_output=True, text=True, timeout=60)
    finally:
        kill_group(service)
        service_log.close()
    job = Job.get_by_id(job_id)
    assert (job.status, job.total_images, job.progress["stages"]["process"]["processed"]) == (JobStatus.SUCCESS, 12, 12)
    assert json.loads(status.stdout)["detections"] > 0
    written = "\n".join([made.stdout, made.stderr, status.stdout, status.stderr, worker_factory.logs(),
                         (tmp_path / "service.log").read_text(errors="replace")]
                        + [m for (m,) in JobLog.select(JobLog.message).tuples()])
    assert SECRET_KEY not in written


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("args, env, code, message", [
    (["--images", "s3://no-such-bucket-x/night/"], {}, 1, "no bucket 'no-such-bucket-x' on the object storage"),
    (["--images", "s3:///night/"], {}, 1, "not an object storage URL"),
    (["--images", "ftp://host/x/"], {}, 1, "--images takes an s3:// prefix or a local directory"),
    (["s3://some-bucket/night/a.png", "--suffix", "a/b"], {}, 1, "a suffix is a file name ending"),
    (["--images", "s3://traps/night/"], {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, 1,
     "no S3 credentials"),
    (["--images", "s3://traps/night/"], {"PIPELINE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}, 3,
     "object storage unavailable: cannot reach http://127.0.0.1:9"),
])
def test_bad_object_storage_input_is_one_line_and_makes_no_job(s3_settings, moth_pipeline, args, env, code, message,
                                                               tmp_path):
    run_env = {**subprocess_env(s3_settings, **CREDENTIALS), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
               "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true", **env}
    proc = subprocess.run([sys.executable, "cli.py", "enqueue-job", "--pipeline", moth_pipeline, *args], cwd=PROJECT,
                          env=run_env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and SECRET_KEY not in proc.stderr
    assert Job.select().count() == 0


def test_a_presigned_url_lives_at_least_a_whole_lease_and_at_most_seven_days():
    with pytest.raises(ConfigError, match="PIPELINE_S3_URL_TTL must be from 360 s"):
        Settings.from_env({"PIPELINE_NATS_TASK_TTR": "30", "PIPELINE_NATS_MAX_DELIVER": "2",
                           "PIPELINE_S3_URL_TTL": "120"})
    with pytest.raises(ConfigError, match="to 604800 s"):
        Settings.from_env({"PIPELINE_S3_URL_TTL": "700000"})
    with pytest.raises(ConfigError, match="PIPELINE_S3_ENDPOINT_URL must be an http"):
        Settings.from_env({"PIPELINE_S3_ENDPOINT_URL": "minio:9000"})


def test_a_new_job_reuses_the_objects_it_saw_before_and_processes_a_replaced_one_again(
        s3_settings, runtime, bucket, moth_pipeline, trap_images, service_factory, monkeypatch):
    name, client = bucket
    keys = upload(client, name, trap_images, count=3)
    first = create_job(moth_pipeline, [f"s3://{name}/night-1/"])
    dispatch(runtime, first.id)
    service_factory(s3_settings, moth_pipeline, get_handler(moth_pipeline))
    take_and_save(runtime, first.id, monkeypatch)
    assert Job.get_by_id(first.id).status == JobStatus.SUCCESS
    # When one of the objects is replaced under its key (another picture: another ETag)
    client.put_object(Bucket=name, Key=keys[0], Body=pngs(trap_images)[-1].read_bytes())
    again = create_job(moth_pipeline, [f"s3://{name}/night-1/"])
    # Then the next job over the prefix reuses the two it saw as they are, and processes the replaced one
    assert again.reused_images == 2
    reprocessed = [url for (url,) in SourceImage.select(SourceImage.url).join(JobImage).where(
        (JobImage.job == again.id) & JobImage.reused_from.is_null()).tuples()]
    assert reprocessed == [f"s3://{name}/{keys[0]}"]
