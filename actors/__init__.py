"""Dramatiq actors. Import `pipeline.actors` (which sets the broker first), not this package directly."""

from __future__ import annotations

from actors.advisories import process_task_advisory
from actors.health import jobs_health_check
from actors.results import process_pipeline_result
from actors.run_job import run_job

__all__ = ["jobs_health_check", "process_pipeline_result", "process_task_advisory", "run_job"]
