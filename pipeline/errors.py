"""One error hierarchy for jetpipe. A docstring is the default message."""

from __future__ import annotations


class PipelineError(Exception):
    """jetpipe error."""

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(PipelineError):
    """Invalid configuration."""


class UserInputError(PipelineError):
    """Invalid input from a person or a file (the CLI prints it as one line and exits non-zero)."""


class NotFound(UserInputError):
    """No such object."""


class TooLarge(UserInputError):
    """The request is larger than jetpipe accepts (answered 413)."""


class Conflict(UserInputError):
    """The request contradicts the state of things (answered 409): no retry of the same request can help."""


class Forbidden(UserInputError):
    """The caller may not do this (a service changing another service's pipeline)."""


class NothingToDo(PipelineError):
    """The request is already met (retry a job without failures, cancel an ended job): not an error."""


class BadResult(PipelineError):
    """A result message is malformed or does not belong to its job; it can never succeed."""

    def __init__(self, message: str, *, image_ids: tuple[str, ...] = ()):
        super().__init__(message)
        self.image_ids = image_ids


class TransientError(PipelineError):
    """A dependency (Redis, NATS, the database) could not be reached; retry later."""


class TasksNotAcked(TransientError):
    """Results were taken into the inbox (committed), but NATS did not confirm the ACKs of their tasks."""

    def __init__(self, message: str, *, job_ids: list[int]):
        super().__init__(message)
        self.job_ids = job_ids


class JobSlotsFull(TransientError):
    """A pipeline's tasks stream holds as many job consumers as it allows (PIPELINE_NATS_MAX_JOBS): a job to
    start waits until one ends."""


class StateMissing(PipelineError):
    """The job's Redis state does not exist (Redis flushed or restarted, or the job was cleaned up)."""
