"""The raw Dramatiq floor of `benchmarks/run.py`: a no-op actor on the bench's Redis, no jetpipe logic.

    dramatiq floor_actors --path benchmarks -p 1 -t 8
"""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

QUEUE = "floor"
broker = RedisBroker(url=os.environ["PIPELINE_REDIS_URL"], namespace="floor")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(job_id: int, body: str, reply: str | None) -> None:
    """Receives what process_pipeline_result receives, does nothing."""
