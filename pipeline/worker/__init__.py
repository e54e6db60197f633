"""A Dramatiq worker's wiring: its middleware (the per-process runtime, the bridge from JetStream, the
scheduler, presence), the poison-message guard, and the `internal` dispatch mode the worker runs itself.
The module workers run is `pipeline.actors`.
"""
