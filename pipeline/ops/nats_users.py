"""NATS users for processing services: each team its own user, limited to its own pipelines.

A service user may do what the wire contract asks of a service for its pipelines and nothing else: list
and read its pipelines' job consumers, pull their tasks, send `+WPI` on their reply subjects, publish
results on its pipelines' result subjects (and put those too large for a message in its pipelines' result
buckets), read replies on its own inbox prefix (`_INBOX.<user>`, the
SDK's default for that user), and hear its pipelines' new jobs announced (`pipeline.jobs.<slug>`).
Another pipeline's tasks, results and replies, jetpipe's own replies and the advisories are out of its
reach: NATS refuses them, whatever the service's code does. (A permission matches whole subject tokens
only; that is why each pipeline has a tasks stream of its own.)

`cli.py nats service-user NAME --pipeline P` prints the block to add to `deploy/nats-users.conf`.
"""

from __future__ import annotations

import json

from pipeline import names
from pipeline.errors import UserInputError
from pipeline.schemas import is_valid_slug


def service_permissions(user: str, pipelines: list[str]) -> dict:
    """The NATS permissions of a processing service's user that serves `pipelines`."""
    publish = ["$JS.API.INFO"]
    for slug in pipelines:
        stream = names.tasks_stream(slug)
        bucket = names.result_objects_bucket(slug)
        publish += [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.CONSUMER.LIST.{stream}",
                    f"$JS.API.CONSUMER.NAMES.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.*",
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>", f"pipeline.results.{slug}.>",
                    # its bucket for results too large for one message: put (and look up) objects there
                    f"$JS.API.STREAM.INFO.OBJ_{bucket}", f"$JS.API.STREAM.MSG.GET.OBJ_{bucket}",
                    f"$JS.API.DIRECT.GET.OBJ_{bucket}", f"$JS.API.DIRECT.GET.OBJ_{bucket}.>",
                    f"$JS.API.STREAM.PURGE.OBJ_{bucket}", f"$O.{bucket}.>"]
    subscribe = [f"_INBOX.{user}.>", *(names.job_announcements(slug) for slug in pipelines)]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def password_variable(user: str) -> str:
    """The environment variable the server reads the user's password from (`JETPIPE_NATS_<USER>_PASSWORD`)."""
    return "JETPIPE_NATS_" + "".join(c if c.isalnum() else "_" for c in user.removeprefix("jetpipe-")).upper() \
        + "_PASSWORD"


def service_user_block(user: str, pipelines: list[str], *, password_var: str | None = None) -> str:
    """The entry of `authorization.users` for a service user (NATS configuration syntax)."""
    if not user or not all(c.isalnum() or c in "-_" for c in user):
        raise UserInputError(f"NATS user {user!r} must be letters, digits, '-' or '_' (it becomes a subject token)")
    if not pipelines:
        raise UserInputError("a service user needs at least one pipeline (--pipeline SLUG)")
    bad = [slug for slug in pipelines if not is_valid_slug(slug)]
    if bad:
        raise UserInputError(f"pipeline slug {bad[0]!r} must be letters, digits, '-' or '_'")
    if password_var is not None and not (password_var[:1].isalpha() or password_var[:1] == "_") \
            or password_var is not None and not all(c.isalnum() or c == "_" for c in password_var):
        raise UserInputError(f"--password-env {password_var!r} must be an environment variable's name")
    permissions = service_permissions(user, pipelines)
    allow = ",\n".join(f"        {json.dumps(subject)}" for subject in permissions["publish"]["allow"])
    listen = ", ".join(json.dumps(subject) for subject in permissions["subscribe"]["allow"])
    return (f"    # {user}: a processing service for {', '.join(pipelines)}\n"
            f"    {{user: {user}, password: ${password_var or password_variable(user)}, permissions: {{\n"
            f"      publish: {{allow: [\n{allow}\n      ]}}\n"
            f"      subscribe: {{allow: [{listen}]}}\n"
            f"    }}}}")
