"""service/server.py: ActiveCalls counts a call until every layer is done, and the drain waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from service.server import ActiveCalls, SluiceServer
from service.servicer import Lifecycle


def details(method: str) -> Any:
    return SimpleNamespace(method=method, invocation_metadata=())


async def handler_for(calls: ActiveCalls, method: str, behavior: Any, streaming: bool) -> Any:
    factory = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler

    async def continuation(_: Any) -> Any:
        return factory(behavior)

    return await calls.intercept_service(continuation, details(method))


async def test_a_stream_counts_until_it_ends_even_when_it_raises() -> None:
    calls = ActiveCalls()
    release = asyncio.Event()

    async def stream(request: Any, context: Any) -> AsyncIterator[int]:
        yield 1
        await release.wait()
        raise RuntimeError("ended by the drain")

    wrapped = (await handler_for(calls, "/sluice.v1.GenerationService/Generate", stream, True)).unary_stream
    it = wrapped(None, None)
    assert await it.__anext__() == 1
    assert calls.in_flight == 1 and not calls.idle.is_set()
    release.set()
    with pytest.raises(RuntimeError):
        await it.__anext__()
    assert calls.in_flight == 0 and calls.idle.is_set()


async def test_unary_calls_count_and_health_is_not_counted() -> None:
    calls = ActiveCalls()
    seen: list[int] = []

    async def unary(request: Any, context: Any) -> str:
        seen.append(calls.in_flight)
        return "ok"

    wrapped = (await handler_for(calls, "/sluice.v1.ModerationService/Moderate", unary, False)).unary_unary
    assert await wrapped(None, None) == "ok" and seen == [1] and calls.idle.is_set()
    health = await handler_for(calls, "/grpc.health.v1.Health/Check", unary, False)
    assert health.unary_unary is unary  # untouched: a Watch stream would hold every drain for its timeout


async def test_drain_stops_the_server_only_after_the_ended_calls_finished() -> None:
    calls = ActiveCalls()
    order: list[str] = []

    class FakeServer:
        async def stop(self, grace: float) -> None:
            order.append(f"stop, running {calls.in_flight}")

    class FakeHealth:
        async def set(self, name: str, status: Any) -> None:
            pass

    server = SluiceServer(FakeServer(), 0, FakeHealth(), Lifecycle(), 0.01, calls)  # type: ignore[arg-type]
    release = asyncio.Event()

    async def stream(request: Any, context: Any) -> AsyncIterator[int]:
        await release.wait()  # the engine's stop ends it; then its last steps still run
        await asyncio.sleep(0.05)
        order.append("call finished")
        yield 1

    server.on_stop.append(lambda: None)
    wrapped = (await handler_for(calls, "/sluice.v1.GenerationService/Generate", stream, True)).unary_stream

    async def consume() -> None:
        async for _ in wrapped(None, None):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, release.set)
    await server.drain()
    await task
    assert order == ["call finished", "stop, running 0"]


async def test_a_stream_closed_by_its_consumer_closes_the_inner_one_at_once() -> None:
    calls = ActiveCalls()
    closed: list[str] = []

    async def stream(request: Any, context: Any) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append("inner")  # e.g. the engine slot: freed when the client goes away, not at GC

    wrapped = (await handler_for(calls, "/sluice.v1.GenerationService/Generate", stream, True)).unary_stream
    it = wrapped(None, None)
    assert await it.__anext__() == 1
    await it.aclose()
    assert closed == ["inner"] and calls.in_flight == 0 and calls.idle.is_set()
