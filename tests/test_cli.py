"""The CLI speaks to people: every bad input gives one readable line, a non-zero exit, no traceback, and
leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import models
from models import Job
from tests.conftest import PROJECT


@pytest.fixture
def cli(tmp_path, stack):
    """Run `python cli.py ARGS` against a fresh SQLite database and the session's NATS and Redis."""
    env = {"PIPELINE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "PIPELINE_REDIS_URL": stack.redis_url,
           "PIPELINE_NATS_URL": stack.nats_url, "PATH": "/usr/bin:/bin", "COLUMNS": "200"}

    def run(*args, expect: int = 0, **extra_env) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == expect, f"exit {proc.returncode}: {proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        return proc

    run.db_url = env["PIPELINE_DATABASE_URL"]
    run.env = env
    return run


@pytest.fixture
def ready(cli, tmp_path):
    """Schema created and moth-demo registered."""
    from pipeline.sdk import moth

    cli("init-db")
    spec = tmp_path / "moth.json"
    spec.write_text(json.dumps(moth.PIPELINE_SPEC))
    cli("pipeline", "register", str(spec))
    return cli


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def job_rows(db_url: str) -> int:
    models.bind(db_url)
    with models.database.connection_context():
        return Job.select().count()


def test_help_lists_commands_settings_and_exit_codes(cli):
    out = cli("--help").stdout
    for command in ("init-db", "pipeline", "enqueue-job", "jobs", "status", "watch", "logs", "cancel",
                    "process", "up", "down", "demo"):
        assert f"  {command}" in out
    assert "PIPELINE_NATS_MAX_DELIVER" in out and "(default: 2)" in out
    assert "PIPELINE_FAILURE_THRESHOLD" in out and "(default: 0.5)" in out
    assert "database, Redis or NATS unreachable" in out


def test_init_db_is_idempotent(cli):
    cli("init-db")
    assert "database ready" in cli("init-db").stdout


def test_commands_before_init_db_say_what_to_do(cli):
    assert "run `python cli.py init-db`" in one_error_line(cli("status", "1", expect=1))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a valid pipeline file"),
    ('{"slug": "p", "name": "P", "algorithms": [{"key": "c", "name": "C", "task_type": "classification"}]}',
     "needs at least one detection algorithm"),
    ('{"slug": "a.b", "name": "P", "algorithms": []}', "must be letters, digits"),
])
def test_bad_pipeline_file(cli, tmp_path, content, message):
    cli("init-db")
    spec = tmp_path / "p.json"
    spec.write_text(content)
    assert message in one_error_line(cli("pipeline", "register", str(spec), expect=1))


def test_missing_pipeline_file(cli):
    cli("init-db")
    assert "cannot read" in one_error_line(cli("pipeline", "register", "/no/such.json", expect=1))


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "nope", "file:///a.png"], "unknown pipeline 'nope' (registered: moth-demo)"),
    (["--pipeline", "moth-demo"], "no images given"),
    (["--pipeline", "moth-demo", "--images-file", "/no/such/list.txt"], "cannot read --images-file"),
    (["--pipeline", "moth-demo", "--images-dir", "/no/such/dir"], "is not a directory"),
    (["--pipeline", "moth-demo", "file:///ok.png", "ftp://host/x.png"], "not an image URL"),
    (["--pipeline", "moth-demo", "https:///nohost.png"], "URL without a host"),
    (["--pipeline", "moth-demo", "--limit", "0", "file:///a.png"], "--limit must be at least 1"),
    (["--pipeline", "moth-demo", "--notify", "https://hook.example/h", "--notify-on", "started,paused",
      "file:///a.png"], "unknown webhook event 'job.paused' (use started, failing, ended)"),
])
def test_bad_enqueue_input_leaves_no_job(ready, args, message):
    assert message in one_error_line(ready("enqueue-job", *args, expect=1,
                                           PIPELINE_NOTIFY_SECRET="whsec-test-0123456789abcdef"))
    assert job_rows(ready.db_url) == 0


def test_empty_image_directory(ready, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in one_error_line(ready("enqueue-job", "--pipeline", "moth-demo", "--images-dir", str(empty),
                                               expect=1))
    assert job_rows(ready.db_url) == 0


def test_redis_unreachable_when_enqueuing_exits_3_and_leaves_no_job(ready):
    proc = ready("enqueue-job", "--pipeline", "moth-demo", "file:///a.png", expect=3,
                 PIPELINE_REDIS_URL="redis://127.0.0.1:1/0")
    assert "could not queue the job" in one_error_line(proc)
    assert job_rows(ready.db_url) == 0


def test_enqueue_json_then_status_and_jobs(ready, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("# traps\nfile:///traps/1.png\n\nfile:///traps/2.png\n/traps/3.png\n")
    job = json.loads(ready("enqueue-job", "--pipeline", "moth-demo", "--images-file", str(listing), "--json",
                           "--name", "night 1").stdout)
    assert (job["id"], job["total_images"], job["status"], job["name"]) == (1, 3, "PENDING", "night 1")
    status = json.loads(ready("status", "1", "--json").stdout)
    assert status["stages"]["collect"]["total"] == 3 and status["failed_images"] == []
    assert "night 1" in ready("jobs").stdout
    assert json.loads(ready("jobs", "--status", "pending", "--json").stdout)[0]["id"] == 1


NO_BROKER = """
import sys
import pipeline.infra.broker

def refuse(*args, **kwargs):
    sys.exit("a Dramatiq broker was built")

pipeline.infra.broker.make_broker = refuse
import cli
sys.argv = ["cli.py", *sys.argv[1:]]
cli.main()
"""


def test_read_only_commands_build_no_broker(ready, tmp_path):
    ready("enqueue-job", "--pipeline", "moth-demo", "file:///traps/1.png")
    for args in (["status", "1"], ["jobs"], ["logs", "1"], ["failures", "1"], ["health", "--json"],
                 ["dlq", "list"]):
        proc = subprocess.run([sys.executable, "-c", NO_BROKER, *args], cwd=PROJECT, capture_output=True, text=True,
                              env=ready.env, timeout=60)
        assert "a Dramatiq broker was built" not in proc.stderr, args
        assert proc.returncode in (0, 1), (args, proc.stderr)  # health: degraded (no worker) is fine
    # (and the guard works: a command that sends a message does build one)
    sent = subprocess.run([sys.executable, "-c", NO_BROKER, "enqueue-job", "--pipeline", "moth-demo",
                           "file:///traps/2.png"], cwd=PROJECT, capture_output=True, text=True, env=ready.env)
    assert "a Dramatiq broker was built" in sent.stderr


def test_unknown_job_ids(ready):
    for command in ("status", "watch", "logs", "cancel"):
        assert "no job 42" in one_error_line(ready(command, "42", expect=1))
    # --json answers in JSON, on stdout, even when it fails
    for command in ("status", "logs", "failures", "retry-failed"):
        proc = ready(command, "42", "--json", expect=1)
        assert json.loads(proc.stdout) == {"error": "no job 42", "exit_code": 1}, command


def test_local_paths_are_images_like_urls(ready, tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    job = json.loads(ready("enqueue-job", "--pipeline", "moth-demo", "--json", str(tmp_path / "a.png"),
                           "file:///elsewhere/b.png").stdout)
    assert job["total_images"] == 2
    assert "no such image file: 'missing.png'" in one_error_line(
        ready("enqueue-job", "--pipeline", "moth-demo", "missing.png", expect=1))


def test_bad_setting_is_one_line(cli):
    proc = cli("status", "1", expect=1, PIPELINE_NATS_MAX_DELIVER="lots")
    assert "PIPELINE_NATS_MAX_DELIVER='lots' is not a valid int" in one_error_line(proc)


def test_process_refuses_a_pipeline_without_a_model(cli):
    assert "no built-in model for pipeline 'other'" in one_error_line(cli("process", "--pipeline", "other", expect=1))


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be between 1 and 1000"),
    (["--batch-size", "1001"], "--batch-size must be between 1 and 1000"),
])
def test_process_refuses_bad_numbers(cli, args, message):
    assert message in one_error_line(cli("process", "--pipeline", "moth-demo", *args, expect=1))


def test_text_from_a_service_is_shown_literally(ready, tmp_path):
    # Given a job whose image a processing service failed with text that looks like rich markup, HTML and
    # a terminal escape sequence, in a job named likewise
    from models import ImageStatus, JobImage, JobLog

    why = "processing service error: [/x] [bold]<script>alert(1)</script> \x1b[31mred"
    out = ready("enqueue-job", "--pipeline", "moth-demo", "--name", "[red]night[/x]", "--json",
                "https://example.invalid/a.jpg").stdout
    job_id = json.loads(out)["id"]
    models.bind(ready.db_url)
    with models.database.connection_context():
        JobImage.update(status=ImageStatus.FAILED, error=why).where(JobImage.job == job_id).execute()
        JobLog.insert(job=job_id, level="WARNING", message=f"image failed: {why}").execute()
    # When people look at it, every command succeeds and shows the text as written, the escape inert
    shown = "processing service error: [/x] [bold]<script>alert(1)</script> \\x1b[31mred"
    failures = ready("failures", str(job_id)).stdout
    status = ready("status", str(job_id)).stdout
    logs = ready("logs", str(job_id)).stdout
    jobs = ready("jobs").stdout
    for out in (failures, status, logs):
        assert shown in " ".join(out.split()) or shown in out, out
        assert "\x1b" not in out
    assert "[red]night[/x]" in status and "[red]night[/x]" in jobs


def test_up_and_down_say_where_things_are_and_down_names_processes_still_using_the_stack(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "300"}

    def cli_here(*args):
        return subprocess.run([sys.executable, str(PROJECT / "cli.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    up = cli_here("up")
    assert up.returncode == 0, up.stderr
    exports = dict(line[len("export "):].split("=", 1) for line in up.stdout.splitlines()
                   if line.startswith("export "))
    assert exports["PIPELINE_DATABASE_URL"] == f"sqlite:///{tmp_path / '.pipeline' / 'pipeline.db'}"
    assert f"database {exports['PIPELINE_DATABASE_URL']}" in up.stdout
    worker = subprocess.Popen([sys.executable, "-m", "dramatiq", "pipeline.actors", "-p", "1", "-t", "1"],
                              cwd=PROJECT, env={**env, **exports, "PIPELINE_METRICS_PORT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        down = cli_here("down")
        assert down.returncode == 0, down.stderr
        assert f"the data stays in {tmp_path / '.pipeline'}/" in down.stdout
        assert f"{worker.pid} (worker)" in down.stderr and down.stderr.startswith("warning: ")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert "no stack is up" in cli_here("down").stdout


def test_a_services_text_cannot_split_or_forge_a_line_of_the_job_log(cli, runtime, moth_pipeline):
    """A newline or an escape sequence in a processing service's error is spelled out in `cli.py logs`,
    and in the process's own log lines, never written raw."""
    import logging

    from pipeline.infra import logs
    from tests.helpers import dispatch, error_body, fake_job, handle_result_message, pull_tasks

    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    forged = "lens cap\n2026-12-06 06:00:00 ERROR   job finished SUCCESS\r\x1b[2J"
    handle_result_message(runtime, job.id, error_body(task.image_id, forged), reply, task.task_token)
    out = cli("logs", str(job.id), PIPELINE_DATABASE_URL=runtime.settings.database_url).stdout
    assert "\x1b" not in out and "\r" not in out
    assert not any(line.startswith("2026-12-06 06:00:00") for line in out.splitlines())
    assert "lens cap\\n2026-12-06 06:00:00 ERROR   job finished SUCCESS\\r\\x1b[2J" in out
    # the process's own log: one line per record, whatever the message holds
    record = logging.LogRecord("pipeline.job", logging.WARNING, __file__, 1, "job=%s image failed: %s",
                               (job.id, forged), None)
    assert logs.OneLine().filter(record) and "\n" not in record.getMessage() and "\x1b" not in record.getMessage()


def test_an_operator_gives_a_pipeline_to_a_service_and_prints_its_nats_user(ready, tmp_path):
    from pipeline.sdk import moth

    spec = tmp_path / "moth.json"
    spec.write_text(json.dumps(moth.PIPELINE_SPEC))
    assert "for service gpu-lab" in ready("pipeline", "register", str(spec), "--service", "gpu-lab").stdout
    listed = json.loads(ready("pipeline", "list", "--json").stdout)
    assert [(p["slug"], p["service"]) for p in listed] == [(moth.SLUG, "gpu-lab")]
    ready("pipeline", "register", str(spec))  # an update without --service keeps it
    assert json.loads(ready("pipeline", "list", "--json").stdout)[0]["service"] == "gpu-lab"
    assert "gpu-lab" in ready("pipeline", "list").stdout
    assert "--service needs" in one_error_line(ready("pipeline", "register", str(spec), "--service", " ", expect=1))
    # the team's NATS user: its pipelines' subjects only, its own inbox
    block = ready("nats", "service-user", "gpu-lab", "--pipeline", moth.SLUG).stdout
    assert "password: $JETPIPE_NATS_GPU_LAB_PASSWORD" in block and '"_INBOX.gpu-lab.>"' in block
    assert '"$JS.API.CONSUMER.MSG.NEXT.PIPELINE_TASKS_moth-demo.*"' in block and "pipeline.results.moth-demo.>" in block
    assert "PIPELINE_TASKS." not in block  # nothing of the old shared stream
    for args, message in ((["bad name", "--pipeline", "x"], "must be letters"), (["lab"], "Missing option"),
                          (["lab", "--pipeline", "a.b"], "must be letters"),
                          (["lab", "--pipeline", "x", "--password-env", "1$"], "environment variable")):
        proc = ready("nats", "service-user", *args, expect=1 if "Missing" not in message else 2)
        assert message in proc.stderr and "Traceback" not in proc.stderr
