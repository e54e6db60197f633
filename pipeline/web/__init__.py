"""jetpipe's web face: the dashboard pages and the JSON API `/api/v1`, one ASGI application served by
`cli.py web`. It calls the same functions as the CLI (jobs, job_views, health_report, dlq, registry,
export): there is no second implementation of cancel, retry, status or health."""
