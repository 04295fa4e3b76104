"""grpc.aio wiring: servicers, health, reflection, interceptors, TLS, and a graceful drain on SIGTERM.

Lifecycle: health NOT_SERVING while the model loads and warms up -> SERVING -> on SIGTERM: NOT_SERVING,
new generation calls get UNAVAILABLE, in-flight streams may finish within `server.grace_seconds`, the
rest end with UNAVAILABLE, the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service._pb.sluice.v1 import generation_pb2, generation_pb2_grpc, moderation_pb2, moderation_pb2_grpc
from service.config import Config, SecurityConfig, ServerConfig
from service.errors import ErrorInterceptor, MalformedRequestInterceptor
from service.handlers import behavior_of, rebuild
from service.servicer import GenerationServicer, InFlight, Lifecycle, ModerationServicer

log = logging.getLogger(__name__)

GENERATION = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
MODERATION = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"].full_name
# Health and reflection stay open under token auth: probes and grpcurl must work without the token.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# After the engine stops, how long a drain waits for the calls it ended to finish their last step (the error
# status, the request log line) before the server stops: the server cancels what is still running.
FINISH_SECONDS = 2.0


def channel_options(cfg: ServerConfig) -> list[tuple[str, Any]]:
    """Server channel arguments from config (message sizes, keepalive, connection age)."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
        ("grpc.max_send_message_length", cfg.max_send_message_bytes),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_seconds * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if cfg.max_connection_age_seconds > 0:
        # Clients reconnect (and re-resolve DNS) after this, so new replicas get traffic after scale-out.
        opts.append(("grpc.max_connection_age_ms", int(cfg.max_connection_age_seconds * 1000)))
        opts.append(("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_seconds * 1000)))
    return opts


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bearer-token auth: `authorization: Bearer <token>`, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        supplied = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                supplied = value[len("Bearer "):].encode()
        if hmac.compare_digest(supplied, self._token):
            return await continuation(details)
        handler = await continuation(details)
        return _deny(handler)


class ActiveCalls(InFlight, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Outermost interceptor: counts the Generation and Moderation calls still running, observers included.

    A call the drain ended (engine stopped, UNAVAILABLE) still has steps to run after its handler gives up:
    the error status, the request log line, the metrics. `grpc.aio.Server.stop` does not wait for those and
    cancels them, and grpc logs the cancellation with a traceback; the drain waits for `idle` first.
    Health and reflection calls (long-lived Watch streams) are not counted.
    """

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        behavior = behavior_of(handler)
        if inspect.isasyncgenfunction(behavior):
            return rebuild(handler, self._wrap_stream(behavior))
        if inspect.iscoroutinefunction(behavior):
            return rebuild(handler, self._wrap_unary(behavior))
        return handler  # a sync handler runs in grpc's thread pool; the server registers none

    def _wrap_unary(self, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        async def wrapped(request: Any, context: Any) -> Any:
            with self.track():
                return await behavior(request, context)

        return wrapped

    def _wrap_stream(self, behavior: Callable[[Any, Any], AsyncIterator[Any]]
                     ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            # aclosing: when the client goes away, the inner generators' finally blocks (the engine slot) run now
            with self.track():
                async with contextlib.aclosing(behavior(request, context)) as responses:  # type: ignore[type-var]
                    async for response in responses:
                        yield response

        return wrapped


def _deny(handler: Any) -> Any:
    """A handler of the same kind that aborts with UNAUTHENTICATED before any work is done."""

    async def unary(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def stream(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    return rebuild(handler, stream if handler.response_streaming else unary)


def server_credentials(sec: SecurityConfig) -> grpc.ServerCredentials | None:
    if sec.tls_cert is None:
        return None
    if sec.tls_key is None:
        raise ValueError("security.tls_key is required with security.tls_cert")
    ca = sec.tls_client_ca.read_bytes() if sec.tls_client_ca else None
    return grpc.ssl_server_credentials([(sec.tls_key.read_bytes(), sec.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class SluiceServer:
    """A started server: the port it bound, health control, and drain."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    life: Lifecycle
    grace_seconds: float
    calls: ActiveCalls = field(default_factory=ActiveCalls)
    on_drain: list[Callable[[], None]] = field(default_factory=list)  # engine.stop_accepting, ...
    on_stop: list[Callable[[], None]] = field(default_factory=list)  # engine.stop, ...

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", GENERATION, MODERATION):
            await self.health.set(name, status)

    async def drain(self) -> None:
        """SIGTERM: stop taking work, let in-flight streams finish within the grace, end the rest."""
        log.info("draining: %d requests in flight, grace %.1fs", self.life.in_flight, self.grace_seconds)
        self.life.draining = True
        await self.set_serving(False)
        for fn in self.on_drain:
            fn()
        with contextlib.suppress(TimeoutError):  # the grace ran out: the streams left are ended below
            await asyncio.wait_for(self.life.idle.wait(), self.grace_seconds)
        for fn in self.on_stop:
            await asyncio.get_running_loop().run_in_executor(None, fn)  # remaining streams end UNAVAILABLE
        with contextlib.suppress(TimeoutError):  # their last steps (status, log line), not cancelled mid-way
            await asyncio.wait_for(self.calls.idle.wait(), FINISH_SECONDS)
        await self.server.stop(1.0)
        log.info("stopped")


async def start_server(config: Config, generation: GenerationServicer, moderation: ModerationServicer,
                       life: Lifecycle, auth_token: str | None,
                       extra_interceptors: Sequence[Any] = ()) -> SluiceServer:
    # extra_interceptors run first after ActiveCalls, so an observing one (grpc_metrics.CallInterceptor) sees the
    # statuses the error mapping and the auth check produce. The auth check comes before the error mapping:
    # a caller without the token learns UNAUTHENTICATED, never how its request parsed or validated.
    calls = ActiveCalls()  # outermost: a call counts until every other layer is done with it
    interceptors: list[Any] = [calls, *extra_interceptors]
    if auth_token:
        interceptors.append(TokenAuthInterceptor(auth_token))
    interceptors.extend((ErrorInterceptor(), MalformedRequestInterceptor()))
    server = grpc.aio.server(interceptors=interceptors, options=channel_options(config.server))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
    moderation_pb2_grpc.add_ModerationServiceServicer_to_server(moderation, server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if config.server.reflection:
        names = (GENERATION, MODERATION, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    addr = f"{config.server.host}:{config.server.port}"
    creds = server_credentials(config.security)
    port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    s = SluiceServer(server, port, hs, life, config.server.grace_seconds, calls)
    await s.set_serving(False)  # until the model is loaded and warmed up
    await server.start()
    return s


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
