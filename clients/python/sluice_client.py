#!/usr/bin/env python3
"""A Python client for sluice, on the real grpcio library.

Install with `pip install clients/python` (the generated stubs ship in sluice/v1/), or run
this file from a checkout.

    python sluice_client.py --addr localhost:50051 --certs ../../certs publish \
        --service checkout --message "order placed" --user-id u-1
    python sluice_client.py --addr localhost:50051 --certs ../../certs ingest events.ndjson
    python sluice_client.py --addr localhost:50051 --certs ../../certs stream events.ndjson

`ingest` and `stream` read NDJSON events ({"service", "message", "timestamp"?, "user_id"?,
"metadata"?, "id"?}); a missing timestamp means now. Both honour RESOURCE_EXHAUSTED with
google.rpc.RetryInfo (a full buffer, BUFFER_FULL, or the principal's rate limit, RATE_LIMITED):
they wait the advised delay and resend exactly what was not yet accepted. `--token JWT` sends a
bearer token with every call.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
GEN_DIR = os.path.join(HERE, "gen")


def _generate_stubs():
    """Stubs ship with the package (sluice/v1/, made by grpcio-tools from ../../proto); a
    checkout whose stubs were removed regenerates them into ./gen."""
    if os.path.exists(os.path.join(HERE, "sluice", "v1", "ingest_pb2_grpc.py")):
        return HERE
    marker = os.path.join(GEN_DIR, "sluice", "v1", "ingest_pb2_grpc.py")
    if os.path.exists(marker):
        return GEN_DIR
    os.makedirs(GEN_DIR, exist_ok=True)
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = [os.path.join("sluice", "v1", name) for name in ("event.proto", "ingest.proto", "query.proto")]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
         f"--python_out={GEN_DIR}", f"--grpc_python_out={GEN_DIR}", *protos],
        check=True,
    )
    for package in (os.path.join(GEN_DIR, "sluice"), os.path.join(GEN_DIR, "sluice", "v1")):
        open(os.path.join(package, "__init__.py"), "a").close()
    return GEN_DIR


sys.path.insert(0, _generate_stubs())

import grpc  # noqa: E402
from google.protobuf import struct_pb2, timestamp_pb2  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from sluice.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc, query_pb2, query_pb2_grpc  # noqa: E402


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
                  grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):
        metadata = tuple(details.metadata or ()) + self.metadata
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def channel(addr, certs, plaintext=False, token=None):
    if plaintext:
        base = grpc.insecure_channel(addr)
        return grpc.intercept_channel(base, BearerToken(token)) if token else base
    read = lambda name: open(os.path.join(certs, name), "rb").read()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"), private_key=read("client.key"), certificate_chain=read("client.pem"))
    secure = grpc.secure_channel(addr, credentials)
    return grpc.intercept_channel(secure, BearerToken(token)) if token else secure


def make_event(record):
    timestamp = timestamp_pb2.Timestamp()
    if record.get("timestamp"):
        timestamp.FromJsonString(record["timestamp"])
    else:
        timestamp.GetCurrentTime()
    metadata = struct_pb2.Struct()
    metadata.update(record.get("metadata") or {})
    return event_pb2.Event(
        id=record.get("id") or str(uuid.uuid4()), service=record["service"], message=record["message"],
        timestamp=timestamp, user_id=record.get("user_id", ""), metadata=metadata)


def retry_delay(error):
    """The RetryInfo delay of a refusal, in seconds, or None when it carries none."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def trailer(error, key):
    for name, value in error.trailing_metadata() or ():
        if name == key:
            return int(value)
    return 0


def ingest(stub, events, batch=500, attempts=50):
    """Client streaming with resend-the-rest on RESOURCE_EXHAUSTED.

    Returns (accepted, rejected, refusals): refusals counts the calls refused and resent."""
    accepted = rejected = refusals = 0
    remaining = list(events)
    for _ in range(attempts):
        requests = (ingest_pb2.IngestRequest(events=remaining[i:i + batch]) for i in range(0, len(remaining), batch))
        try:
            response = stub.Ingest(requests)
            return accepted + response.accepted, rejected + response.rejected, refusals
        except grpc.RpcError as error:
            delay = retry_delay(error)
            if error.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) or delay is None:
                raise
            done_accepted, done_rejected = trailer(error, "sluice-accepted"), trailer(error, "sluice-rejected")
            accepted, rejected = accepted + done_accepted, rejected + done_rejected
            remaining = remaining[done_accepted + done_rejected:]
            refusals += 1
            time.sleep(delay)
    raise RuntimeError("gave up after repeated refusals")


def stream(stub, events, batch=500, window=8):
    """Bidirectional streaming: one ack per sequence, `window` requests in flight, and no more
    unacknowledged events than the server's last credit (an ack's credit_events; one request
    may always be in flight). Refused sequences are resent after their retry_after.

    Returns (accepted, rejected, refusals): refusals counts the sequences refused and resent."""
    import threading

    batches = {seq: events[i:i + batch] for seq, i in enumerate(range(0, len(events), batch))}
    accepted = rejected = refusals = 0
    credit = None
    while batches:
        changed = threading.Condition()
        in_flight = {}
        stopped = []

        def may_send(size):
            if stopped:
                return True
            if len(in_flight) >= window:
                return False
            held = sum(in_flight.values())
            return credit is None or held == 0 or held + size <= credit

        def requests(todo=sorted(batches.items())):
            for seq, evs in todo:
                with changed:
                    changed.wait_for(lambda: may_send(len(evs)))
                    if stopped:
                        return
                    in_flight[seq] = len(evs)
                yield ingest_pb2.IngestRequest(events=evs, sequence=seq)

        delay = 0.0
        try:
            for ack in stub.IngestStream(requests()):
                with changed:
                    in_flight.pop(ack.sequence, None)
                    if ack.HasField("credit_events"):
                        credit = ack.credit_events
                    changed.notify_all()
                if ack.code == 0:
                    accepted += ack.accepted
                    rejected += ack.rejected
                    batches.pop(ack.sequence, None)
                else:
                    refusals += 1
                    delay = max(delay, ack.retry_after.seconds + ack.retry_after.nanos / 1e9)
        finally:
            with changed:
                stopped.append(True)
                changed.notify_all()
        time.sleep(delay)
    return accepted, rejected, refusals


def query_all(stub, services=(), user_id="", limit=100):
    """Every matching event, following page tokens; each as a dict."""
    events, token = [], ""
    while True:
        page = stub.Query(query_pb2.QueryRequest(services=list(services), user_id=user_id,
                                                 limit=limit, page_token=token))
        events.extend(json_format.MessageToDict(event, preserving_proto_field_name=True)
                      for event in page.events)
        if not page.next_page_token:
            return events
        token = page.next_page_token


def read_ndjson(path):
    with open(path) as source:
        return [make_event(json.loads(line)) for line in source if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="localhost:50051")
    parser.add_argument("--certs", default="certs", help="directory with ca.pem, client.pem, client.key")
    parser.add_argument("--plaintext", action="store_true")
    parser.add_argument("--token", help="a bearer JWT sent with every call (principal = its sub)")
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="send one event (unary Publish)")
    publish.add_argument("--service", required=True)
    publish.add_argument("--message", required=True)
    publish.add_argument("--user-id", default="")
    publish.add_argument("--metadata", default="{}", help="JSON object")
    for name in ("ingest", "stream"):
        command = commands.add_parser(name, help=f"send NDJSON events ({name})")
        command.add_argument("file")
        command.add_argument("--batch", type=int, default=500)
    query = commands.add_parser("query", help="print matching events as NDJSON (all pages)")
    query.add_argument("--service", action="append", default=[])
    query.add_argument("--user-id", default="")
    query.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()

    connection = channel(args.addr, args.certs, args.plaintext, args.token)
    if args.command == "query":
        for event in query_all(query_pb2_grpc.QueryServiceStub(connection), args.service,
                               args.user_id, args.limit):
            print(json.dumps(event))
        return
    stub = ingest_pb2_grpc.IngestServiceStub(connection)
    if args.command == "publish":
        record = {"service": args.service, "message": args.message, "user_id": args.user_id,
                  "metadata": json.loads(args.metadata)}
        response = stub.Publish(ingest_pb2.IngestRequest(events=[make_event(record)]))
        accepted, rejected, refusals = response.accepted, response.rejected, 0
        for rejection in response.rejections:
            print(f"rejected #{rejection.index} {rejection.field}: {rejection.reason}", file=sys.stderr)
    elif args.command == "ingest":
        accepted, rejected, refusals = ingest(stub, read_ndjson(args.file), args.batch)
    else:
        accepted, rejected, refusals = stream(stub, read_ndjson(args.file), args.batch)
    print(json.dumps({"accepted": accepted, "rejected": rejected, "refusals": refusals}))


if __name__ == "__main__":
    main()
