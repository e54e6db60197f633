"""Add a fresh password for every secret docker-compose.yml needs to an env file (`.env` by default), leaving
those already set alone: `make secrets`. Standard library only. Keep the file out of version control."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

#: Every password docker-compose.yml reads; compose refuses to start without each.
SECRETS = ("JETPIPE_NATS_WORKER_PASSWORD", "JETPIPE_NATS_OPERATOR_PASSWORD", "JETPIPE_NATS_SERVICE_PASSWORD",
           "JETPIPE_NATS_ROUTE_PASSWORD", "JETPIPE_REDIS_PASSWORD", "JETPIPE_POSTGRES_PASSWORD",
           "JETPIPE_GRAFANA_PASSWORD")


def add_missing(path: Path) -> list[str]:
    """Append the secrets `path` does not set yet (URL-safe: they go into connection URLs); their names."""
    text = path.read_text() if path.exists() else ""
    present = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line and not line.startswith("#")}
    missing = [name for name in SECRETS if name not in present]
    if missing:
        lines = ["# passwords made by `make secrets` (deploy/make_secrets.py): never commit them"]
        lines += [f"{name}={secrets.token_urlsafe(24)}" for name in missing]
        path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(lines) + "\n")
    return missing


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".env")
    added = add_missing(target)
    print(f"{target}: added {', '.join(added)}" if added else f"{target}: every secret is already set")
