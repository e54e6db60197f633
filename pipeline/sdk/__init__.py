"""The processing-service SDK: pull a pipeline's tasks, run a model, publish results (over NATS, or over the
web server's HTTP gateway). Written for service authors; docs/processing-services.md is the contract.

    from pipeline.sdk import ProcessingService, HttpTransport
"""

from pipeline.sdk.http_transport import HttpTransport
from pipeline.sdk.nats_transport import NatsTransport, service_inbox_prefix
from pipeline.sdk.service import BATCH_SIZE, ProcessingService
from pipeline.sdk.transport import Transport

__all__ = ["BATCH_SIZE", "HttpTransport", "NatsTransport", "ProcessingService", "Transport", "service_inbox_prefix"]
