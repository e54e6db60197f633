"""The README's "Running it yourself" block works as written: run line by line in bash, in a copy of the
repository (so `.pipeline/` and the images land in a temporary directory), with the worker and the service
in the background as it says. The job must end SUCCESS with the ground truth's detections."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

import models
from models import Job, JobStatus
from tests.conftest import PROJECT

pytestmark = pytest.mark.slow


def readme_block() -> list[str]:
    text = (PROJECT / "README.md").read_text()
    section = text[text.index("## Running it yourself"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def copy_of_the_repository(target) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        if not (PROJECT / name).exists():
            continue  # deleted in the work tree, not yet committed
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, target / name)  # mtimes kept: `make install` finds the venv up to date
    (target / ".venv").symlink_to(PROJECT / ".venv")


def test_the_readme_runs_a_job_to_success_line_by_line(tmp_path):
    lines = readme_block()
    assert lines[0].startswith("make install") and lines[-1].startswith("python cli.py down")
    copy_of_the_repository(tmp_path)
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/bin:/bin"  # nothing of the venv on PATH until the README activates it
    env["COLUMNS"] = "160"
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the block left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-4000:]
    assert "job 1: SUCCESS" in out, out[-4000:]
    # And what it did is in the database it told us about: the truth's moths, every image processed
    models.bind(f"sqlite:///{tmp_path / '.pipeline' / 'pipeline.db'}")
    try:
        job = Job.get_by_id(1)
        truth = json.loads((tmp_path / "traps" / "ground_truth.json").read_text())
        stages = job.progress["stages"]
        assert job.status == JobStatus.SUCCESS
        assert (stages["process"]["processed"], stages["process"]["failed"]) == (len(truth), 0)
        assert stages["results"]["detections"] == sum(len(moths) for moths in truth.values())
    finally:
        models.database.obj.close()
    assert "stopped 2 server(s)" in out
