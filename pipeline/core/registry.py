"""Pipeline registration: a pipeline and the algorithms results may name (anything else is bad data)."""

from __future__ import annotations

from typing import Any

from models import Algorithm, Pipeline, database
from pipeline.errors import Forbidden, NotFound
from pipeline.schemas import PipelineSpec


def register_pipeline(spec: PipelineSpec, *, service: str | None = None, for_service: str | None = None) -> bool:
    """Create or update the pipeline and upsert its algorithms; True if the pipeline is new.

    The pipeline belongs to one processing service (`Pipeline.registered_by`, a gateway token's name): only
    that service may use it through the gateway, or change it. `service`: the service registering it through
    the gateway, which may change only a pipeline that is its own (Forbidden otherwise); None: an operator,
    who may change any and, with `for_service`, give it to a service. Algorithms are never deleted: results
    already saved may reference them.
    """
    with database.atomic():
        pipeline, created = Pipeline.get_or_create(  # type: ignore[no-untyped-call]
            slug=spec.slug, defaults={"name": spec.name, "registered_by": service or for_service,
                                      "version": spec.fingerprint()})
        if not created and service is not None and pipeline.registered_by != service:
            owner = f"service {pipeline.registered_by!r}" if pipeline.registered_by else "an operator"
            raise Forbidden(f"pipeline {spec.slug!r} was registered by {owner}: service {service!r} may not "
                            "change it")
        changed = not created and (pipeline.name != spec.name or pipeline.version != spec.fingerprint() or (
            service is None and for_service is not None and pipeline.registered_by != for_service))
        if changed:
            pipeline.name = spec.name
            pipeline.version = spec.fingerprint()  # a new version: no job reuses results saved before it
            if service is None and for_service is not None:
                pipeline.registered_by = for_service
            pipeline.save()
        for algo in spec.algorithms:
            Algorithm.insert(pipeline=pipeline, key=algo.key, name=algo.name, task_type=algo.task_type).on_conflict(
                conflict_target=[Algorithm.pipeline, Algorithm.key],
                update={Algorithm.name: algo.name, Algorithm.task_type: algo.task_type}).execute()
    return bool(created)


def list_pipelines() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in Pipeline.select().order_by(Pipeline.slug):
        algos = Algorithm.select().where(Algorithm.pipeline == p).order_by(Algorithm.id)
        out.append({"slug": p.slug, "name": p.name, "service": p.registered_by, "version": p.version,
                    "algorithms": [{"key": a.key, "name": a.name, "task_type": a.task_type} for a in algos]})
    return out


def existing_pipeline(slug: str) -> Pipeline:
    """The pipeline `slug`; raises NotFound naming the registered ones."""
    pipeline = Pipeline.get_or_none(Pipeline.slug == slug)
    if pipeline is None:
        known = ", ".join(p.slug for p in Pipeline.select(Pipeline.slug).order_by(Pipeline.slug)) or "none"
        raise NotFound(f"unknown pipeline {slug!r} (registered: {known})")
    return pipeline
