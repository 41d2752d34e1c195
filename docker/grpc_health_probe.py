"""Container health check for the engine: asks a gRPC server's standard health service
(grpc.health.v1.Health/Check, https://github.com/grpc/grpc/blob/master/doc/health-checking.md)
and exits 0 only when the answer is SERVING.

    python grpc_health_probe.py [--service NAME] [--timeout SECONDS] HOST:PORT

Exit codes: 0 SERVING; 1 any other status (NOT_SERVING while loading or draining,
SERVICE_UNKNOWN) or no answer (refused, timed out). One line on stdout says which, so
`docker inspect` shows why a container is unhealthy. Needs grpcio and
grpcio-health-checking only, which the engine image has anyway.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """(serving, what the server said or why it said nothing)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    return reply.status == SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="exit 0 when a gRPC server's health service answers SERVING")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="the service to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    serving, status = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
