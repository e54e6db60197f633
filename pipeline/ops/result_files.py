"""A job's results as a file in a binary format (pipeline/ops/export.py: Parquet; pipeline/ops/camtrap.py: the
Camera Trap Data Package): what `cli.py results --format parquet|camtrap-dp -o FILE` and the API call."""

from __future__ import annotations

from pipeline.errors import UserInputError
from pipeline.ops import camtrap, export


def write_file(job_id: int, fmt: str, path: str) -> int:
    """Write the job's results to `path` in `fmt` (export.FILE_FORMATS); how many rows (Parquet) or observations
    (Camtrap DP). NotFound or UserInputError before anything is written."""
    if fmt not in export.FILE_FORMATS:
        raise UserInputError(f"unknown results file format {fmt!r} (use {' or '.join(export.FILE_FORMATS)})")
    if fmt == "parquet":
        return export.write_parquet(job_id, path)
    return camtrap.write_package(export.job_to_export(job_id), path)
