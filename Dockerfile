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
RUN pip install .
CMD ["python", "cli.py", "--help"]
