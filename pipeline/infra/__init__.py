"""Adapters to the servers jetpipe runs on: Redis (job state, presence, dead letters), NATS JetStream (the
task queue), Dramatiq's broker, the per-process runtime that holds the connections, metrics and logs.

Nothing here knows the job lifecycle's rules; `pipeline.core` decides, these modules carry it out.
"""
