"""Observes every gRPC call: when it started, how it ended (status code), how long it took, and the
pipeline's RequestRecord when the call produced one. Observers (metrics.PrometheusSink, logs.RequestLogger)
turn that into series and log lines; this module knows neither Prometheus nor log formats.

Why wrap the behaviour (as errors.ErrorInterceptor does): a grpc.aio interceptor only sees the method
handler, so a streaming call can only be timed over its whole stream, and its final status seen, by
replacing the handler's behaviour with a wrapper that iterates it. The status comes from
`context.code()` (set by `abort`, `abort_with_status` or `set_code`); a cancelled handler task means the
client cancelled, or the deadline passed when (almost) no time remains. Register `CallInterceptor` FIRST
(outermost), so it sees the statuses ErrorInterceptor and TokenAuthInterceptor produce.

Counting each generation request exactly once: the pipeline hands its RequestRecord to a StatsSink;
`RecordingSink` notes it in the current call's scope (a ContextVar: grpc.aio runs every call in its own
task, so the scope is per call). At the end the observers receive a `CallEnd` carrying that record, or
None when the call failed before the pipeline made one (validation, queue full, auth, cancel). Counters
of requests are incremented there, once, from `finish_reason_of(end)`; the sink's record_request feeds
only the histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import grpc
import grpc.aio
from google.protobuf.message import Message

from guard.moderator import Verdict
from guard.stream import PrefilterOutcome
from service.handlers import behavior_of, rebuild
from service.stats import NullSink, RequestRecord, StatsSink

log = logging.getLogger(__name__)

Context = Any  # grpc.aio.ServicerContext: grpc ships no type stubs

# The gRPC ecosystem's grpc_type label values (go-grpc-prometheus), by (request_streaming, response_streaming).
CALL_KINDS: Final[Mapping[tuple[bool, bool], str]] = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}

# A client's deadline timer fires first and resets the stream; the server's copy of that deadline (from the
# grpc-timeout header) ends later by about the one-way latency. A cancel this close to it is the deadline.
DEADLINE_SLACK_SECONDS: Final = 0.1

# Calls refused before any generation work: the client's request (bad arguments, no guard, auth), the
# server's capacity (queue full) or its lifecycle (draining). Retrying elsewhere or later may succeed.
REJECTED_CODES: Final = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
})


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What is known about a call when it starts. All fields are bounded (method names, not requests)."""

    method: str  # "/sluice.v1.GenerationService/Generate"
    service: str  # "sluice.v1.GenerationService"
    name: str  # "Generate"
    kind: str  # a CALL_KINDS value

    @classmethod
    def parse(cls, method: str, request_streaming: bool, response_streaming: bool) -> CallInfo:
        """Split a full method name.

        Args:
            method: "/package.Service/Method".
            request_streaming / response_streaming: the handler's shape.

        Returns:
            The CallInfo; service and name are "unknown" for a malformed method name.
        """
        service, _, name = method.lstrip("/").rpartition("/")
        return cls(method, service or "unknown", name or "unknown",
                   CALL_KINDS[(request_streaming, response_streaming)])


@dataclass(frozen=True, slots=True)
class CallEnd:
    """How a call ended.

    Args:
        info: the call.
        code: the status the client received.
        seconds: handler start -> end, over the whole response stream.
        request_id: the client's request_id, else the one the server echoed in the final message, else "".
        record: the pipeline's record of the generation, None if the call made none.
        request: the request message of a unary-request call. Holds user text: observers may read it only
            when told to (log.text), never for metrics.
    """

    info: CallInfo
    code: grpc.StatusCode
    seconds: float
    request_id: str = ""
    record: RequestRecord | None = None
    request: object | None = None


@runtime_checkable
class CallObserver(Protocol):
    """Receives call starts and ends (on the event loop; keep it cheap and non-blocking)."""

    def call_started(self, info: CallInfo) -> None: ...

    def call_finished(self, end: CallEnd) -> None: ...


def finish_reason_of(end: CallEnd) -> str | None:
    """The bounded outcome label of a call, for sluice_requests_total and request logs.

    Args:
        end: the finished call.

    Returns:
        The record's finish reason when the pipeline made one; otherwise from the status: CANCELLED ->
        "cancelled", DEADLINE_EXCEEDED -> "deadline", a REJECTED_CODES code -> "rejected", any other
        failure -> "error". None for OK without a record (a call that generates nothing).
    """
    if end.record is not None:
        return end.record.finish_reason
    if end.code is grpc.StatusCode.OK:
        return None
    if end.code is grpc.StatusCode.CANCELLED:
        return "cancelled"
    if end.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline"
    return "rejected" if end.code in REJECTED_CODES else "error"


class _Scope:
    """Per-call mutable state shared between the interceptor and RecordingSink."""

    __slots__ = ("record", "request_id")

    def __init__(self, request_id: str) -> None:
        self.record: RequestRecord | None = None
        self.request_id = request_id


_SCOPE: ContextVar[_Scope | None] = ContextVar("sluice_call_scope", default=None)


class RecordingSink:
    """A StatsSink that notes each RequestRecord in the current call's scope, then forwards it."""

    def __init__(self, inner: StatsSink | None = None) -> None:
        self.inner: StatsSink = inner if inner is not None else NullSink()

    def record_request(self, record: RequestRecord) -> None:
        scope = _SCOPE.get()
        if scope is not None:
            scope.record = record
        self.inner.record_request(record)

    def record_verdict(self, verdict: Verdict) -> None:
        self.inner.record_verdict(verdict)

    def record_prefilter(self, outcome: PrefilterOutcome) -> None:
        self.inner.record_prefilter(outcome)

    def record_held_flags(self, confirmed: int, cleared: int) -> None:
        self.inner.record_held_flags(confirmed, cleared)


class _Call:
    """One call in flight: its scope, start time, and the status it ended with."""

    def __init__(self, info: CallInfo, request: object, observers: Sequence[CallObserver],
                 clock: Callable[[], float]) -> None:
        self.info = info
        self.request = None if info.kind in ("client_stream", "bidi_stream") else request
        self.observers = observers
        self.clock = clock
        self.scope = _Scope(_request_id(self.request))
        self.sent_final = False  # the last response yielded carried the final message
        _SCOPE.set(self.scope)  # the call's own task context: no reset needed, nothing else shares it
        for o in observers:
            _guarded(o.call_started, info)
        self.start = clock()

    def saw(self, response: object) -> None:
        final = _final_of(response)
        self.sent_final = final is not None
        if final is not None and not self.scope.request_id:
            self.scope.request_id = _request_id(final)

    def end(self, context: Context, error: BaseException | None) -> None:
        code = _status(context, error)
        if code is grpc.StatusCode.CANCELLED and self.sent_final:
            # The contract's last message was handed to grpc: a client that stops reading at the final
            # message (and cancels) hangs up while the server is still closing the stream. Completed.
            code = grpc.StatusCode.OK
        end = CallEnd(self.info, code, self.clock() - self.start, self.scope.request_id, self.scope.record,
                      self.request)
        for o in self.observers:
            _guarded(o.call_finished, end)


def _guarded(fn: Callable[[Any], None], arg: object) -> None:
    try:
        fn(arg)
    except Exception:  # an observer's bug must not fail or hide the client's call; it is logged, loudly
        log.exception("call observer %r failed", fn)


def _status(context: Context, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()  # set by abort / abort_with_status / set_code
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):  # grpc cancels the call's task on cancel and on deadline
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    if isinstance(error, GeneratorExit):  # the stream was closed before its end
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception no interceptor mapped


def _request_id(request: object) -> str:
    rid = getattr(request, "request_id", "")
    return rid if isinstance(rid, str) else ""


def _final_of(response: object) -> Message | None:
    """The `final` message of a GenerateResponse / CompleteResponse when it is set (it ends a stream)."""
    if isinstance(response, Message) and "final" in response.DESCRIPTOR.fields_by_name \
            and response.HasField("final"):
        final = getattr(response, "final", None)
        return final if isinstance(final, Message) else None
    return None


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Reports every call of the server to the observers (see the module docstring).

    Args:
        observers: who is told about starts and ends.
        clock: seconds, monotonic (tests inject one).
    """

    def __init__(self, observers: Sequence[CallObserver], clock: Callable[[], float] = time.perf_counter) -> None:
        self.observers = tuple(observers)
        self.clock = clock

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        """Return the next handler with its behaviour wrapped.

        Args:
            continuation: the next interceptor or the handler lookup.
            details: carries the full method name.

        Returns:
            An RpcMethodHandler of the same kind, or None for an unknown method (gRPC answers UNIMPLEMENTED).
        """
        handler = await continuation(details)
        if handler is None:
            return None
        info = CallInfo.parse(details.method, handler.request_streaming, handler.response_streaming)
        return rebuild(handler, self._wrap(behavior_of(handler), info))

    def _wrap(self, behavior: Any, info: CallInfo) -> Any:
        if inspect.isasyncgenfunction(behavior):
            return self._wrap_stream(behavior, info)
        if inspect.iscoroutinefunction(behavior):
            return self._wrap_unary(behavior, info)
        return behavior  # a sync handler runs in grpc's thread pool; the server registers none

    def _wrap_unary(self, behavior: Callable[[Any, Context], Awaitable[Any]],
                    info: CallInfo) -> Callable[[Any, Context], Awaitable[Any]]:
        async def wrapped(request: Any, context: Context) -> Any:
            call = _Call(info, request, self.observers, self.clock)
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
                call.saw(response)
                return response
            except BaseException as e:  # observed, then re-raised untouched (aborts, cancellation, bugs)
                error = e
                raise
            finally:
                call.end(context, error)

        return wrapped

    def _wrap_stream(self, behavior: Callable[[Any, Context], AsyncIterator[Any]],
                     info: CallInfo) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(info, request, self.observers, self.clock)
            error: BaseException | None = None
            try:
                # aclosing: when the client goes away, the inner generator's finally blocks run now
                async with contextlib.aclosing(behavior(request, context)) as responses:  # type: ignore[type-var]
                    async for response in responses:
                        call.saw(response)
                        yield response
            except BaseException as e:  # observed, then re-raised untouched (aborts, cancellation, bugs)
                error = e
                raise
            finally:
                call.end(context, error)

        return wrapped


