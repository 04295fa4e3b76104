"""gRPC health check over TLS, for exec probes: the kubelet's native gRPC probe speaks plaintext only.

    python /etc/sluice/probe/grpc_health_tls.py SERVICE SERVER_NAME [PORT] [TIMEOUT]

Exit 0 when SERVICE reports SERVING, 1 otherwise. Trusts ca.crt from the mounted TLS Secret (tls.crt when the
certificate is self-signed and there is no ca.crt); SERVER_NAME must be one of the certificate's DNS names.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TLS_DIR = os.environ.get("PROBE_TLS_DIR", "/etc/sluice/tls")


def main(argv: list[str]) -> int:
    service, server_name = argv[0], argv[1]
    port = int(argv[2]) if len(argv) > 2 else 50051
    timeout = float(argv[3]) if len(argv) > 3 else 4.0
    ca_file = os.path.join(TLS_DIR, "ca.crt")
    if not os.path.exists(ca_file):
        ca_file = os.path.join(TLS_DIR, "tls.crt")
    with open(ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as err:
            print(f"health check failed: {err.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{service or 'overall'}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
