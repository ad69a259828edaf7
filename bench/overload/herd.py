#!/usr/bin/env python3
"""A herd of stock grpcio calls: CALLS concurrent Publish calls of EVENTS events each, with a
service-config retry policy as a user writes it (5 attempts, RESOURCE_EXHAUSTED retryable;
grpcio honours grpc-retry-pushback-ms). Prints one JSON line:
{client, calls, ok, failed, failures, seconds, seconds_to_last_ok}.

    SLUICE_ADDR=localhost:50051 SLUICE_CERTS=certs CALLS=60 EVENTS=200 python bench/overload/herd.py
"""

import json
import os
import re
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "clients", "python"))

import grpc  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402
from sluice.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc  # noqa: E402

ADDR = os.environ.get("SLUICE_ADDR", "localhost:50051")
CERTS = os.environ.get("SLUICE_CERTS", "certs")
NAME = os.environ.get("SLUICE_CLIENT", "client")
CALLS = int(os.environ.get("CALLS", "60"))
EVENTS = int(os.environ.get("EVENTS", "200"))
SERVICE = os.environ.get("SERVICE", "herd-py")

SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": "sluice.v1.IngestService"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
        },
    }],
}


def read(name):
    with open(os.path.join(CERTS, name), "rb") as file:
        return file.read()


def request():
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return ingest_pb2.IngestRequest(events=[
        event_pb2.Event(id=str(uuid.uuid4()), service=SERVICE, message=f"herd event {n}", timestamp=now)
        for n in range(EVENTS)
    ])


def main():
    credentials = grpc.ssl_channel_credentials(read("ca.pem"), read(f"{NAME}.key"), read(f"{NAME}.pem"))
    channel = grpc.secure_channel(ADDR, credentials, options=[
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ])
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    started = time.monotonic()
    futures = [stub.Publish.future(request(), timeout=60) for _ in range(CALLS)]
    ok, last_ok, failures = 0, 0.0, {}
    pending = set(range(CALLS))
    while pending:
        for index in list(pending):
            future = futures[index]
            if not future.done():
                continue
            pending.discard(index)
            try:
                future.result()
                ok += 1
                last_ok = time.monotonic() - started
            except grpc.RpcError as error:
                key = f"{error.code().name}: {re.sub('[0-9]+', 'N', error.details() or '')}"
                failures[key] = failures.get(key, 0) + 1
        time.sleep(0.005)
    print(json.dumps({
        "client": "grpcio", "calls": CALLS, "ok": ok, "failed": CALLS - ok, "failures": failures,
        "seconds": time.monotonic() - started, "seconds_to_last_ok": last_ok,
    }))
    channel.close()


if __name__ == "__main__":
    main()
