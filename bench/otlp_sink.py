"""An OTLP/gRPC trace receiver that accepts every export and counts spans' bytes, for
bench/tracing.sh: sluice's export then costs what it costs against a real gRPC peer.

    python bench/otlp_sink.py PORT
"""
import signal
import sys
from concurrent import futures

import grpc

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
received = {"requests": 0, "bytes": 0}


def export(request: bytes, context) -> bytes:
    received["requests"] += 1
    received["bytes"] += len(request)
    return b""  # an empty ExportTraceServiceResponse: everything accepted


class Sink(grpc.GenericRpcHandler):
    def service(self, handler_call_details):
        if handler_call_details.method != EXPORT:
            return None
        # Raw bytes in and out: the sink never decodes, so it costs the bench little CPU.
        return grpc.unary_unary_rpc_method_handler(export)


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((Sink(),))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()

    def stop(*_):
        print(f"otlp sink: {received['requests']} exports, {received['bytes']} bytes", flush=True)
        server.stop(0)

    signal.signal(signal.SIGTERM, stop)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
