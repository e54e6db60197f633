# One image for every jetpipe process: workers, the reference processing service, the CLI.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY models ./models
COPY actors ./actors
COPY cli.py ./
COPY examples ./examples
# the plain install: no [embedded] nats-server/redis-server binaries (the stack brings its own servers)
# no process of jetpipe's needs root; /data/images (the compose stack's images volume, which a new volume
# takes its owner from) is the one place it writes
RUN pip install . && useradd --system --uid 10001 --home-dir /app jetpipe \
    && mkdir -p /data/images && chown jetpipe /data/images
USER jetpipe
CMD ["python", "cli.py", "--help"]
