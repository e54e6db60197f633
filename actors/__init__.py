"""Dramatiq actors. Import `pipeline.actors` (which sets the broker first), not this package directly."""

from __future__ import annotations

from actors.results import process_pipeline_result
from actors.run_job import run_job

__all__ = ["process_pipeline_result", "run_job"]
