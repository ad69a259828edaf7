#!/usr/bin/env python3
"""Emits logs through the stock OpenTelemetry Python SDK to sluice, as a service would: the
standard `logging` module, the SDK's LoggingHandler, a BatchLogRecordProcessor and the stock
OTLP exporter (gRPC with mTLS credentials, or HTTP). Records are emitted inside spans, so each
carries its span's trace id. SENDERS threads each run their own LoggerProvider and exporter,
so that their exports reach the server at once.

    SLUICE_ADDR=localhost:50051 SLUICE_CERTS=certs RECORDS=1000 python tests/otel/emit_logs.py

Prints one JSON line: {"records", "trace_ids", "export_errors"}; export_errors counts the
exporter's own error log lines (a batch it gave up on).
"""

import json
import logging
import os
import threading
import warnings

from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

ADDR = os.environ.get("SLUICE_ADDR", "localhost:50051")
CERTS = os.environ.get("SLUICE_CERTS", "certs")
CLIENT = os.environ.get("SLUICE_CLIENT", "client")
RECORDS = int(os.environ.get("RECORDS", "1000"))
SENDERS = int(os.environ.get("SENDERS", "1"))
PROTOCOL = os.environ.get("PROTOCOL", "grpc")
SERVICE = os.environ.get("SERVICE")  # unset: the SDK's default, unknown_service:python3
TOKEN = os.environ.get("SLUICE_TOKEN")


class ErrorCounter(logging.Handler):
    """Counts the exporter's error lines: a batch it could not deliver."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.lines = []

    def emit(self, record):
        self.count += 1
        self.lines.append(record.getMessage())


def read(name):
    with open(os.path.join(CERTS, name), "rb") as file:
        return file.read()


def exporter():
    headers = {"authorization": f"Bearer {TOKEN}"} if TOKEN else None
    if PROTOCOL == "http":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

        return OTLPLogExporter(
            endpoint=f"https://{ADDR}/v1/logs",
            certificate_file=os.path.join(CERTS, "ca.pem"),
            client_certificate_file=os.path.join(CERTS, f"{CLIENT}.pem"),
            client_key_file=os.path.join(CERTS, f"{CLIENT}.key"),
            headers=headers,
        )
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

    credentials = grpc.ssl_channel_credentials(
        read("ca.pem"), read(f"{CLIENT}.key"), read(f"{CLIENT}.pem")
    )
    return OTLPLogExporter(endpoint=ADDR, credentials=credentials, headers=headers)


def send(sender, count, trace_ids):
    attributes = {"service.name": SERVICE} if SERVICE else {}
    resource = Resource.create({**attributes, "deployment.environment": "test"})
    provider = LoggerProvider(resource=resource)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter()))
    handler = LoggingHandler(logger_provider=provider)
    log = logging.getLogger(f"sender-{sender}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    tracer = TracerProvider(resource=resource).get_tracer("emit_logs")
    with tracer.start_as_current_span(f"sender {sender}") as span:
        trace_ids.append(format(span.get_span_context().trace_id, "032x"))
        for n in range(count):
            if n == 0:
                try:
                    raise ValueError("card declined")
                except ValueError:
                    log.exception("payment failed", extra={"enduser.id": f"user-{sender}"})
            else:
                log.info("order %d of sender %d", n, sender, extra={"order.id": n})
    provider.force_flush()
    provider.shutdown()


def main():
    warnings.simplefilter("ignore", DeprecationWarning)
    errors = ErrorCounter()
    logging.getLogger("opentelemetry").addHandler(errors)
    trace_ids = []
    threads = []
    per_sender = RECORDS // SENDERS
    for sender in range(SENDERS):
        count = per_sender + (RECORDS % SENDERS if sender == 0 else 0)
        thread = threading.Thread(target=send, args=(sender, count, trace_ids))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    print(json.dumps({
        "records": RECORDS,
        "trace_ids": trace_ids,
        "export_errors": errors.count,
        "errors": errors.lines[:5],
    }))


if __name__ == "__main__":
    main()
