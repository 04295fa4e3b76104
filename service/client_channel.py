"""Channel settings shared by the async and the blocking client: retry policy, TLS, options, metadata.

Retries are gRPC's own retry policy, set through the channel's service config, not a hand-written loop.
It retries only UNAVAILABLE (a draining or unreachable replica) and RESOURCE_EXHAUSTED (a full queue),
with exponential backoff and jitter, within the call's one deadline, and honours the server's
`grpc-retry-pushback-ms`. For the Generate stream that is exactly "only before the first message": gRPC
commits an attempt as soon as response headers arrive, which the server sends with the first message, so
a stream that has delivered anything is never replayed. Retry throttling stops a fleet of clients from
multiplying the load on an overloaded server. Replaying is safe: a rejected request did no work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

# Long enough for a full answer at the server's default token cap under load; callers with tighter
# budgets pass their own.
DEFAULT_TIMEOUT: Final = 120.0
# The server's default limits; a larger response would be rejected by it anyway.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
RETRYABLE_CODES: Final = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
_SERVICES: Final = ("sluice.v1.GenerationService", "sluice.v1.ModerationService")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC retry parameters (gRPC caps max_attempts at 5).

    Args:
        max_attempts: total attempts including the first; 1 disables retries.
        initial_backoff: seconds before the first retry (before jitter).
        max_backoff: ceiling of the backoff.
        backoff_multiplier: growth per retry.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0

    def service_config(self) -> str:
        """The channel service config (JSON) that applies this policy to every sluice.v1 method.

        Returns:
            JSON for the `grpc.service_config` channel option.
        """
        method_config: dict[str, Any] = {"name": [{"service": s} for s in _SERVICES]}
        if self.max_attempts > 1:
            method_config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff:.3f}s",
                "maxBackoff": f"{self.max_backoff:.3f}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            }
        # Retries stop while more than half of recent calls failed (gRPC's token bucket).
        throttling = {"maxTokens": 10, "tokenRatio": 0.1}
        # round_robin: with a `dns:///` target that resolves to every replica (the headless Service), calls
        # spread over all pods instead of pinning one HTTP/2 connection to one pod.
        return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method_config],
                           "retryThrottling": throttling})


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS settings; PEM bytes. `root_certificates=None` uses the system roots.

    Args:
        root_certificates: CA bundle that signed the server's certificate.
        certificate_chain: client certificate, for mutual TLS.
        private_key: its key.
        server_name: expected name in the server certificate when it differs from the target host.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        """Read PEM files.

        Args:
            ca: CA bundle path.
            cert: client certificate path (mutual TLS).
            key: client key path.
            server_name: see the class docstring.

        Returns:
            The settings.
        """
        return cls(
            root_certificates=ca.read_bytes() if ca else None,
            certificate_chain=cert.read_bytes() if cert else None,
            private_key=key.read_bytes() if key else None,
            server_name=server_name,
        )


def channel_options(retry: RetryPolicy, tls: ClientTls | None) -> list[tuple[str, Any]]:
    """Channel arguments shared by the async and sync clients.

    Args:
        retry: the retry policy.
        tls: TLS settings, or None.

    Returns:
        gRPC channel options.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry.service_config()),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def credentials(tls: ClientTls) -> Any:
    """gRPC channel credentials for `tls`.

    Args:
        tls: TLS settings.

    Returns:
        grpc.ChannelCredentials.
    """
    return grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the bearer token.

    Args:
        token: the token, or None.

    Returns:
        `(("authorization", "Bearer <token>"),)`, or nothing without a token.
    """
    # Plain metadata rather than call credentials, so a token also works over a plaintext loopback
    # channel (gRPC refuses call credentials without TLS). Over a network, use TLS.
    return (("authorization", f"Bearer {token}"),) if token else ()
