#!/usr/bin/env python3
"""A flood and a modest sender (issue 27): principal `noisy` (certificate noisy.pem) sends
200-event Publish calls from 16 threads without pause, resending after a short nap when
refused; principal `quiet` sends 100 events every 100 ms for SECONDS (default 10). Prints each
one's calls and refusals.

    SLUICE_ADDR=localhost:50051 SLUICE_CERTS=certs python bench/overload/fair.py
"""

import os
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "clients", "python"))

import grpc  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402
from sluice.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc  # noqa: E402

ADDR = os.environ.get("SLUICE_ADDR", "localhost:50051")
CERTS = os.environ.get("SLUICE_CERTS", "certs")
SECONDS = float(os.environ.get("SECONDS", "10"))


def stub(name):
    def read(file):
        with open(os.path.join(CERTS, file), "rb") as handle:
            return handle.read()

    credentials = grpc.ssl_channel_credentials(read("ca.pem"), read(f"{name}.key"), read(f"{name}.pem"))
    channel = grpc.secure_channel(ADDR, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
    return ingest_pb2_grpc.IngestServiceStub(channel)


def request(service, count):
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return ingest_pb2.IngestRequest(events=[
        event_pb2.Event(id=str(uuid.uuid4()), service=service, message=f"{service} {n}", timestamp=now)
        for n in range(count)
    ])


def main():
    stop = threading.Event()
    counts = {"noisy": [0, 0], "quiet": [0, 0]}
    lock = threading.Lock()

    def flood():
        client = stub("noisy")
        while not stop.is_set():
            try:
                client.Publish(request("noisy", 200), timeout=30)
                outcome = 0
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                outcome = 1
                time.sleep(0.005)
            with lock:
                counts["noisy"][0] += 1
                counts["noisy"][1] += outcome

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    quiet = stub("quiet")
    ended = time.monotonic() + SECONDS
    while time.monotonic() < ended:
        try:
            quiet.Publish(request("quiet", 100), timeout=30)
            counts["quiet"][0] += 1
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            counts["quiet"][0] += 1
            counts["quiet"][1] += 1
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join()
    for name, (calls, refused) in counts.items():
        print(f"{name:5}: {calls} calls, {refused} refused")


if __name__ == "__main__":
    main()
