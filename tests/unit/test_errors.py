"""The error table, the rich status for InvalidArgument, and the wrappers that map exceptions to statuses."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2

from service import errors
from service.errors import (
    STATUS_CODES,
    Cancelled,
    DeadlineExceeded,
    ErrorInterceptor,
    GuardDisabled,
    InvalidArgument,
    PromptTooLong,
    QueueFull,
    SluiceError,
    Unauthenticated,
    Unavailable,
    map_stream_errors,
    map_unary_errors,
    range_problem,
    status_code_for,
    to_status,
    validation_error,
)

EXPECTED_CODES = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    PromptTooLong: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Cancelled: grpc.StatusCode.CANCELLED,
    GuardDisabled: grpc.StatusCode.FAILED_PRECONDITION,
}


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *all_subclasses(sub)}
    return out


def instance(cls: type[SluiceError]) -> SluiceError:
    if cls is PromptTooLong:
        return PromptTooLong(9000, 8192)
    if cls is InvalidArgument:
        return InvalidArgument("prompt", "prompt must not be empty")
    return cls()


class Aborted(Exception):
    """What a real context's abort raises: it ends the handler."""


class FakeContext:
    def __init__(self) -> None:
        self.status: grpc.Status | None = None
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.status = status
        raise Aborted

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self.code, self.details = code, details
        raise Aborted


def test_every_domain_error_is_in_the_table_with_its_code() -> None:
    assert all_subclasses(SluiceError) <= set(STATUS_CODES)
    assert dict(STATUS_CODES) == EXPECTED_CODES
    for cls, code in EXPECTED_CODES.items():
        error = instance(cls)
        assert status_code_for(error) is code
        assert to_status(error).code is code
        assert to_status(error).details == error.message


def test_unlisted_subclass_inherits_its_parents_code() -> None:
    class Draining(Unavailable):
        pass

    assert status_code_for(Draining()) is grpc.StatusCode.UNAVAILABLE


def test_invalid_argument_carries_a_bad_request_field_violation() -> None:
    error = validation_error("sampling.top_p", "must be in (0, 1], got 1.5")
    assert error.message == "sampling.top_p must be in (0, 1], got 1.5"
    status = to_status(error)
    (raw,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(raw)
    assert rich.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert (violation.field, violation.description) == ("sampling.top_p", error.message)


def test_non_argument_errors_carry_no_details() -> None:
    status = to_status(QueueFull())
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    assert list(rich.details) == []
    assert rich.message == "server is at capacity, retry later"


def test_prompt_too_long_message() -> None:
    error = PromptTooLong(9000, 8192, field="messages")
    assert error.field == "messages"
    assert error.message == (
        "messages must be at most 8191 tokens (context window 8192, one token must remain for the answer), "
        "got 9000"
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((1.5, 0.0, 1.0), {"low_open": True}, "must be in (0, 1], got 1.5"),
        ((0.0, 0.0, 1.0), {"low_open": True}, "must be in (0, 1], got 0"),
        ((0.0, 0.0, 1.0), {}, None),
        ((1.0, 0.0, 1.0), {"high_open": True}, "must be in [0, 1), got 1"),
        ((0, 1), {}, "must be >= 1, got 0"),
        ((5, None, 4), {}, "must be <= 4, got 5"),
        ((float("nan"), 0.0, 2.0), {}, "must be a finite number, got nan"),
        ((float("-inf"),), {}, "must be a finite number, got -inf"),
        ((1.100000023841858, 0.0, 1.0), {}, "must be in [0, 1], got 1.1"),
    ],
)
def test_range_problem_wording(args: tuple[Any, ...], kwargs: dict[str, bool], expected: str | None) -> None:
    assert range_problem(*args, **kwargs) == expected


async def test_unary_wrapper_maps_domain_error() -> None:
    async def handler(request: str, context: Any) -> str:
        raise QueueFull()

    context = FakeContext()
    with pytest.raises(Aborted):
        await map_unary_errors(handler, "/sluice.v1.GenerationService/Complete")("req", context)
    assert context.status is not None and context.status.code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unknown_error_is_internal_logged_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: str, context: Any) -> str:
        raise KeyError("the user's secret prompt")

    context = FakeContext()
    with caplog.at_level(logging.ERROR, logger="service.errors"), pytest.raises(Aborted):
        await map_unary_errors(handler, "/m")("req", context)
    assert (context.code, context.details) == (grpc.StatusCode.INTERNAL, "internal error")
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is KeyError  # traceback logged


async def test_stream_wrapper_maps_errors_raised_mid_stream() -> None:
    async def handler(request: str, context: Any) -> AsyncIterator[str]:
        yield "a"
        raise Unavailable()

    wrapped = map_stream_errors(handler, "/m")
    assert inspect.isasyncgenfunction(wrapped)  # grpc.aio picks the streaming path by this
    context = FakeContext()
    received = []
    with pytest.raises(Aborted):
        async for item in wrapped("req", context):
            received.append(item)
    assert received == ["a"]
    assert context.status is not None and context.status.code is grpc.StatusCode.UNAVAILABLE


async def test_wrappers_let_aborts_and_cancellation_through() -> None:
    async def aborting(request: str, context: Any) -> str:
        raise grpc.aio.AbortError()

    async def cancelled(request: str, context: Any) -> AsyncIterator[str]:
        yield "a"
        raise asyncio.CancelledError

    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await map_unary_errors(aborting, "/m")("req", context)
    with pytest.raises(asyncio.CancelledError):
        async for _ in map_stream_errors(cancelled, "/m")("req", context):
            pass
    assert context.status is None and context.code is None  # nothing was mapped


async def test_interceptor_keeps_handler_kind_and_serializers() -> None:
    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield request

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    class Details:
        method = "/sluice.v1.GenerationService/Generate"

    interceptor = ErrorInterceptor()
    for behavior, factory, attr in [
        (stream, grpc.unary_stream_rpc_method_handler, "unary_stream"),
        (unary, grpc.unary_unary_rpc_method_handler, "unary_unary"),
    ]:
        original = factory(behavior, request_deserializer=bytes, response_serializer=bytes)

        async def continuation(details: Any, handler: Any = original) -> Any:
            return handler

        wrapped = await interceptor.intercept_service(continuation, Details())
        new_behavior = getattr(wrapped, attr)
        assert new_behavior is not behavior
        assert inspect.isasyncgenfunction(new_behavior) == inspect.isasyncgenfunction(behavior)
        assert wrapped.request_deserializer is bytes and wrapped.response_serializer is bytes

    async def unknown(details: Any) -> None:
        return None

    assert await interceptor.intercept_service(unknown, Details()) is None


def test_internal_message_is_fixed() -> None:
    assert errors.INTERNAL_MESSAGE == "internal error"
