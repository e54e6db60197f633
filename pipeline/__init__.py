"""jetpipe core library: reliable asynchronous ML jobs over many images.

Modules, one concept each: settings, names, errors, schemas, jobstate (Redis), taskqueue (JetStream),
bridge, progress, results (saving), handling (one result message), jobs (lifecycle), internal (in-worker
mode), broker and middleware (Dramatiq), sdk (processing services), moth (the demo model), devstack.
"""
