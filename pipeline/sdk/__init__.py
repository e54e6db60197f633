"""The processing-service SDK: pull a pipeline's tasks, run a model, publish results (over NATS, or over the
web server's HTTP gateway). Written for service authors; docs/processing-services.md is the contract.

    from pipeline.sdk import ProcessingService
"""

from pipeline.sdk.service import BATCH_SIZE, ProcessingService, service_inbox_prefix

__all__ = ["BATCH_SIZE", "ProcessingService", "service_inbox_prefix"]
