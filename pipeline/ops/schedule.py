"""`GET /api/v1/pipelines/{slug}/schedule` and `cli.py schedule`: a pipeline's running jobs as the services
should see them (pipeline/fairshare.py): each job's claim, share, tasks waiting and tasks delivered so far,
in the order to serve them, for a service written from the contract alone that would rather ask than
compute."""

from __future__ import annotations

from pipeline import fairshare
from pipeline.core import scheduling
from pipeline.core.registry import existing_pipeline
from pipeline.infra.runtime import Runtime
from pipeline.infra.taskqueue import ConsumerState


def of_pipeline(runtime: Runtime, slug: str) -> dict:
    """The pipeline's running async jobs, to serve first first: the highest priority with tasks waiting, then
    the least served for its share (tasks delivered so far divided by its share). Paused jobs and jobs with
    no task waiting come last, with share 0."""
    existing_pipeline(slug)
    claims = [(claim, paused) for claim, _, paused in scheduling.running_claims([slug])]
    states: dict[int, ConsumerState] = {claim.job_id: runtime.tasks.consumer_state(claim.job_id, slug)
                                        for claim, _ in claims}
    waiting = [claim for claim, paused in claims if not paused and states[claim.job_id].num_pending > 0]
    shares = fairshare.shares(waiting)
    top = max((c.priority for c in waiting), default=None)

    def key(claim: fairshare.Claim) -> tuple:
        share = shares.get(claim.job_id, 0.0)
        served = states[claim.job_id].num_delivered / share if share else float("inf")
        return (share == 0.0, -claim.priority, served, claim.job_id)

    ordered = sorted((claim for claim, _ in claims), key=key)
    paused = {claim.job_id for claim, is_paused in claims if is_paused}
    jobs = [{"job_id": c.job_id, "project": c.project, "priority": c.priority, "weight": c.weight,
             "paused": c.job_id in paused, "tasks_waiting": states[c.job_id].num_pending,
             "delivered": states[c.job_id].num_delivered,
             "share": round(shares.get(c.job_id, 0.0), 6) if c.priority == top else 0.0,
             "share_at_its_priority": round(shares.get(c.job_id, 0.0), 6)} for c in ordered]
    unreachable = next((s.error for s in states.values() if not s.reachable), None)
    return {"pipeline": slug, "next": jobs[0]["job_id"] if jobs and jobs[0]["share"] else None, "jobs": jobs,
            **({"nats_error": unreachable} if unreachable else {})}
