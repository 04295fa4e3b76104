"""Domain exceptions and the one table that maps them to gRPC status codes.

Code below the transport raises these; nothing there knows about gRPC. The transport converts them in one
place: `ErrorInterceptor`, registered on the server, or the `map_unary_errors` / `map_stream_errors`
wrappers it is built from.

Why an interceptor that wraps the *behaviour*: a grpc.aio interceptor only sees the method handler, not the
call, so it cannot catch what a streaming handler raises while the response stream is being iterated by
wrapping the call. It can, however, replace the handler's behaviour function with a wrapped one: the
wrapper is itself an async generator (or coroutine) function, so grpc.aio still recognises the handler
kind, and every exception raised during iteration passes through it. One registration covers every RPC
of every service, so no servicer method can forget it.

A `SluiceError` message is sent to the client as the status details: write it for the client, name the
field and the allowed range ("sampling.top_p must be in (0, 1], got 1.5"), and never put prompt or output
text in it. Anything else becomes INTERNAL "internal error"; its traceback is logged, never sent.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeVar

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.handlers import behavior_of, rebuild

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE: Final = "internal error"

Req = TypeVar("Req")
Resp = TypeVar("Resp")
# grpc ships no type stubs: its context is typed as Any at this boundary and nowhere else.
Context = Any


class SluiceError(Exception):
    """Base of every domain error. `message` is client-facing (see the module docstring)."""

    default_message: str = "error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)


class InvalidArgument(SluiceError):
    """A request field is out of its allowed range or form.

    Args:
        field: dotted path of the offending field, e.g. "sampling.top_p" or "messages[2].role".
        message: the whole client-facing message; by convention it starts with `field`.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class PromptTooLong(InvalidArgument):
    """The rendered prompt leaves no room in the context window for even one generated token.

    Args:
        prompt_tokens: tokens in the rendered prompt.
        max_context: the context window as served.
        field: "prompt" or "messages", whichever input the request used.
    """

    def __init__(self, prompt_tokens: int, max_context: int, field: str = "prompt") -> None:
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context
        super().__init__(
            field,
            f"{field} must be at most {max_context - 1} tokens (context window {max_context}, "
            f"one token must remain for the answer), got {prompt_tokens}",
        )


class QueueFull(SluiceError):
    """Every slot is busy and the bounded queue is full: rejected at once instead of queued."""

    default_message = "server is at capacity, retry later"


class DeadlineExceeded(SluiceError):
    """The request's deadline passed (in the queue, the guard or the engine)."""

    default_message = "deadline exceeded"


class Unavailable(SluiceError):
    """The server is draining (SIGTERM) or not yet ready; another replica may serve the request."""

    default_message = "server is shutting down"


class Unauthenticated(SluiceError):
    """Missing or wrong bearer token."""

    default_message = "missing or invalid bearer token"


class Cancelled(SluiceError):
    """The client cancelled; raised below the transport to unwind, mapped only for completeness."""

    default_message = "request cancelled"


class GuardDisabled(SluiceError):
    """Moderation was requested (Moderate, or GuardOptions) but the server runs without a guard."""

    default_message = "moderation is not available: the server runs without a guard (guard.backend = none)"


# THE table. A subclass not listed maps like its nearest listed base (see `status_code_for`).
STATUS_CODES: Final[Mapping[type[SluiceError], grpc.StatusCode]] = MappingProxyType(
    {
        InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        PromptTooLong: grpc.StatusCode.INVALID_ARGUMENT,
        QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
        DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
        Unavailable: grpc.StatusCode.UNAVAILABLE,
        Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        Cancelled: grpc.StatusCode.CANCELLED,
        GuardDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def validation_error(field: str, message: str) -> InvalidArgument:
    """Build an InvalidArgument whose message starts with the field: `validation_error("top_p", "must be
    in (0, 1], got 1.5")` reads "top_p must be in (0, 1], got 1.5".

    Args:
        field: dotted field path.
        message: what is wrong, starting with a verb ("must be ...").

    Returns:
        The exception, to be raised by the caller.
    """
    return InvalidArgument(field, f"{field} {message}")


def range_problem(
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """Describe why `value` is outside an interval, in the one message style used for requests and config.

    Args:
        value: an int or float.
        low: lower bound, or None for none.
        high: upper bound, or None for none.
        low_open: exclude `low` itself.
        high_open: exclude `high` itself.

    Returns:
        None when `value` is finite and inside; else e.g. "must be in (0, 1], got 1.5", "must be >= 1, got 0"
        or "must be a finite number, got nan" (checked first: every comparison with NaN is False).
    """
    if not math.isfinite(value):
        return f"must be a finite number, got {_fmt(value)}"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    if low is not None and high is not None:
        interval = f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    elif low is not None:
        interval = f"{'>' if low_open else '>='} {_fmt(low)}"
    else:
        interval = f"{'<' if high_open else '<='} {_fmt(high if high is not None else 0)}"
    return f"must be {interval}, got {_fmt(value)}"


def _fmt(value: float) -> str:
    # %g so float32 wire values read as sent (1.100000023841858 -> "1.1") and bounds as written ("0", "1").
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def status_code_for(error: SluiceError) -> grpc.StatusCode:
    """Look an error up in `STATUS_CODES`, walking its bases so subclasses inherit their parent's code.

    Args:
        error: a domain error.

    Returns:
        Its status code; INTERNAL for a SluiceError subclass outside the table (a bug, logged by the caller).
    """
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: SluiceError) -> grpc.Status:
    """The rich status for a domain error: code, message, and for InvalidArgument a google.rpc.BadRequest
    detail with one FieldViolation (clients read it with `grpc_status.rpc_status.from_call`).

    Args:
        error: a domain error.

    Returns:
        A grpc.Status for `context.abort_with_status`.
    """
    code = status_code_for(error)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort_for(error: Exception, context: Context, method: str) -> NoReturn:
    """End the RPC with the status for `error`: the table's for domain errors, INTERNAL otherwise.

    Args:
        error: what the handler raised.
        context: the RPC's grpc.aio.ServicerContext.
        method: full method name, for the log line.
    """
    if isinstance(error, SluiceError):
        status = to_status(error)
        if status.code is grpc.StatusCode.INTERNAL:
            logger.error("unmapped domain error %s in %s", type(error).__name__, method)
        else:
            logger.info("%s -> %s (%s)", method, status.code.name, type(error).__name__)
        await context.abort_with_status(status)
    # The traceback goes to the log only; the client learns nothing about the failure.
    logger.error("internal error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("context.abort returned")  # abort always raises; this satisfies NoReturn


class MalformedRequest:
    """Stands in for request bytes that do not parse (invalid UTF-8 in a string, a truncated field), so the
    RPC answers INVALID_ARGUMENT: a raising deserializer makes grpc answer UNKNOWN with the exception text."""

    request_id = ""  # what call observers read from a request

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidArgument:
        problem = f"must be a well-formed {self.type_name} with UTF-8 strings, got bytes that do not parse"
        return validation_error("request", problem)


def map_unary_errors(
    behavior: Callable[[Req, Context], Awaitable[Resp]], method: str
) -> Callable[[Req, Context], Awaitable[Resp]]:
    """Wrap a coroutine handler (unary response) so its exceptions become statuses.

    Args:
        behavior: `async def handler(request, context) -> response`.
        method: full method name, for logs.

    Returns:
        A coroutine function with the same signature.
    """

    async def wrapped(request: Req, context: Context) -> Resp:
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted on purpose: its status stands
        except Exception as error:  # the one place that maps everything
            await abort_for(error, context, method)

    return wrapped


def map_stream_errors(
    behavior: Callable[[Req, Context], AsyncIterator[Resp]], method: str
) -> Callable[[Req, Context], AsyncIterator[Resp]]:
    """Wrap an async-generator handler (streaming response) so exceptions raised at any point of the
    iteration become statuses. Client cancellation (asyncio.CancelledError) passes through untouched.

    Args:
        behavior: `async def handler(request, context)` that yields responses.
        method: full method name, for logs.

    Returns:
        An async generator function with the same signature.
    """

    async def wrapped(request: Req, context: Context) -> AsyncIterator[Resp]:
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # the one place that maps everything
            await abort_for(error, context, method)

    return wrapped


def _wrap_behavior(behavior: Any, method: str) -> Any:
    if behavior is None:
        return None
    if inspect.isasyncgenfunction(behavior):
        return map_stream_errors(behavior, method)
    if inspect.iscoroutinefunction(behavior):
        return map_unary_errors(behavior, method)
    return behavior  # a sync handler runs in grpc's thread pool; we have none, and leave it as it is


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Applies the error mapping to every RPC of the server (see the module docstring)."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        """Return the next handler with its behaviour wrapped.

        Args:
            continuation: the next interceptor or the handler lookup.
            handler_call_details: carries the full method name.

        Returns:
            An RpcMethodHandler of the same kind, or None for an unknown method (gRPC answers UNIMPLEMENTED).
        """
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        return rebuild(handler, _wrap_behavior(behavior_of(handler), method))


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Registered inside `ErrorInterceptor`: a unary request that does not parse reaches the handler as a
    `MalformedRequest`, which the error mapping answers with INVALID_ARGUMENT."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        """Return the next handler (None for an unknown method) with a lenient request deserializer."""
        handler = await continuation(details)
        if handler is None or handler.request_streaming:  # a stream's messages never reach a behaviour alone
            return handler
        parse = handler.request_deserializer  # the message class's FromString
        type_name = getattr(getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None), "full_name", "message")

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return MalformedRequest(type_name)

        return rebuild(handler, request_deserializer=lenient)
