#!/usr/bin/env python3
"""Memory under wide-Struct requests: the attack of issue 15, measured.

Sends pre-serialized requests (grpcio, raw bytes) to a running sluice and samples the server's
RSS from /proc/<pid>/status every 50 ms:

  - ingest: Publish of one ~15.7 MB request whose single event has 350,000 metadata keys
    (string values), alone and 4 at once;
  - query: Query whose metadata_contains is the same Struct, alone and 4 at once, and a Query
    of 22,000 keys, just under grpc.max_query_message_bytes (1 MiB), 4 at once.

Prints idle RSS, peak RSS per phase, and RSS 30 s after the last phase.

    python memory_attack.py --addr localhost:PORT --certs DIR --pid PID
"""

import argparse
import os
import threading
import time

import grpc
from google.protobuf import struct_pb2, timestamp_pb2


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler:
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.05)

    def finish(self):
        self.stop = True
        self.thread.join()
        return max(self.peak, rss_kib(self.pid))


def field(number, wire_type):
    return bytes([(number << 3) | wire_type])


def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number, payload):
    return field(number, 2) + varint(len(payload)) + payload


def wide_struct(keys):
    metadata = struct_pb2.Struct()
    metadata.update({f"k{index:06d}": f"value-{index:022d}" for index in range(keys)})
    return metadata.SerializeToString()


def ingest_request(metadata):
    timestamp = timestamp_pb2.Timestamp()
    timestamp.GetCurrentTime()
    event = (length_delimited(2, b"attack") + length_delimited(3, b"wide metadata")
             + length_delimited(4, timestamp.SerializeToString()) + length_delimited(6, metadata))
    return length_delimited(1, event)


def query_request(metadata):
    return length_delimited(5, metadata) + field(8, 0) + varint(10)


def attack(channel, method, body, concurrency):
    call = channel.unary_unary(method, request_serializer=lambda raw: raw,
                               response_deserializer=lambda raw: raw)
    codes = []

    def one():
        try:
            call(body, timeout=120)
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)

    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--certs", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--keys", type=int, default=350_000)
    parser.add_argument("--settle", type=float, default=30.0)
    args = parser.parse_args()
    read = lambda name: open(os.path.join(args.certs, name), "rb").read()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.secure_channel(args.addr, credentials, options)

    wide = wide_struct(args.keys)
    ingest = ingest_request(wide)
    query = query_request(wide)
    small_query = query_request(wide_struct(22_000))
    print(f"request sizes: ingest {len(ingest) / 1e6:.1f} MB, query {len(query) / 1e6:.1f} MB, "
          f"small query {len(small_query) / 1e6:.2f} MB")
    # Idle means serving a connected client with nothing in flight: warm the connection first.
    attack(channel, "/sluice.v1.QueryService/Query", query_request(b"") , 1)
    time.sleep(1)
    idle = rss_kib(args.pid)
    print(f"idle RSS: {idle / 1024:.1f} MiB")
    phases = [
        ("ingest x1", "/sluice.v1.IngestService/Publish", ingest, 1),
        ("ingest x4", "/sluice.v1.IngestService/Publish", ingest, 4),
        ("query 16 MB x1", "/sluice.v1.QueryService/Query", query, 1),
        ("query 16 MB x4", "/sluice.v1.QueryService/Query", query, 4),
        ("query 1 MiB x4", "/sluice.v1.QueryService/Query", small_query, 4),
    ]
    overall = 0
    for name, method, body, concurrency in phases:
        sampler = Sampler(args.pid)
        codes = attack(channel, method, body, concurrency)
        peak = sampler.finish()
        overall = max(overall, peak)
        print(f"{name}: peak RSS {peak / 1024:.1f} MiB; answers {sorted(set(codes))}")
    time.sleep(args.settle)
    after = rss_kib(args.pid)
    print(f"peak RSS over all phases: {overall / 1024:.1f} MiB")
    print(f"RSS {args.settle:.0f} s after: {after / 1024:.1f} MiB ({after / max(idle, 1):.2f}x idle)")


if __name__ == "__main__":
    main()
