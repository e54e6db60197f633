"""Logs for people and for shippers; a metrics port that is taken costs one line, not a traceback."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.infra import logs
from pipeline.settings import Settings

PROJECT = Path(__file__).resolve().parents[2]


def test_json_logs_carry_job_and_image_ids_as_fields():
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("pipeline.core.saving", logging.WARNING, __file__, 1,
                               "job=%s image=%s refused: %s", (12, "345", 'a "quoted" <b>reason</b>'), None)
    entry = json.loads(formatter.format(record))
    assert (entry["job_id"], entry["image_id"], entry["level"], entry["logger"]) == (12, "345", "WARNING",
                                                                                      "pipeline.core.saving")
    assert entry["message"] == 'job=12 image=345 refused: a "quoted" <b>reason</b>'
    plain = json.loads(formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "no ids", (), None)))
    assert "job_id" not in plain and "image_id" not in plain


def test_a_process_logs_one_json_object_per_line():
    code = ("import logging; from pipeline.infra import logs; from pipeline.settings import get_settings\n"
            "logs.configure(get_settings())\n"
            "logging.getLogger('pipeline.core.jobs').info('job=%s queued for run_job', 7)\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('x').exception('job=8 boom')\n")
    env = {**os.environ, "PIPELINE_LOG_FORMAT": "json", "PIPELINE_LOG_LEVEL": "INFO"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=30)
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(e["job_id"], e["message"]) for e in lines] == [(7, "job=7 queued for run_job"), (8, "job=8 boom")]
    assert "ZeroDivisionError" in lines[1]["error"]


@pytest.mark.parametrize("env, message", [
    ({"PIPELINE_LOG_FORMAT": "xml"}, "PIPELINE_LOG_FORMAT must be one of text, json"),
    ({"PIPELINE_LOG_LEVEL": "LOUD"}, "PIPELINE_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
])
def test_bad_log_settings_are_named(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_a_metrics_port_already_taken_costs_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
                "from pipeline.infra.metrics import run_exposition_server; sys.exit(run_exposition_server())")
        env = {**os.environ, "PIPELINE_METRICS_PORT": str(port), "PIPELINE_METRICS_HOST": "127.0.0.1"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=30)
    assert proc.returncode == 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"WARNING metrics: cannot listen on 127.0.0.1:{port} "), lines
