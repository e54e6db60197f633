"""jetpipe's library: reliable asynchronous ML jobs over many images.

The folders are the layers, lowest first; a module imports only from its own layer or lower ones (the
test `tests/unit/test_seams.py` keeps it so):

- `pipeline/*.py`: the vocabulary every layer shares: `names` (every key, subject and header),
  `settings`, `errors`, `schemas` (the wire contract's messages).
- `infra/`: adapters to the servers: job state in Redis, the JetStream task queue, the Dramatiq broker,
  the per-process runtime, metrics, logs, worker presence.
- `core/`: the job lifecycle: jobs, progress, the results inbox, saving, outcomes, lost and unsaved
  results, deferred failure, the reconciler that keeps every job moving.
- `sdk/`: the processing-service SDK (what a service author imports) and the reference model.
- `worker/`: a Dramatiq worker's wiring: middleware, the bridge from JetStream, the scheduler.
- `ops/`: what people do: the actions both the CLI and the web call, and operators' tools.
- `web/`: the dashboard, the JSON API and the HTTP gateway for processing services.

`pipeline/actors.py` is the module workers run (`dramatiq pipeline.actors`); the actors themselves live
in `actors/` at the top level, and the core never imports them: it sends Dramatiq messages by actor name
(`pipeline.infra.broker.send`).
"""
