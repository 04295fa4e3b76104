"""Shared pieces of the reliability suite: one 8-slot real server, a stream collector that notices hung,
truncated or duplicated finals, a submit counter, a guarded front with an injected moderator, RSS, and the
figures file (`tests/reliability/.last_run.json`, gitignored) the closing notes quote.

The servers are the ones of tests/grpc/conftest.py (`start_served`, `front`, `EngineWatch`), configured for
load: 8 slots (the CI machine's 2 cores decode 8 sequences for little more than one), the default queue of
64, a 1024-token window. Every wait is bounded (`WAIT_SECONDS`, per-call timeouts); nothing sleeps to poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from guard.moderator import Message, Moderator, Role, Stage, Verdict
from service._pb.sluice.v1 import generation_pb2, generation_pb2_grpc
from service.app import build_app
from service.config import Config
from service.engine.engine import Engine, RequestHandle
from service.engine.types import GenerationRequest
from service.server import start_server
from tests.grpc.conftest import WAIT_SECONDS, Served, server_config, start_served

FIGURES = Path(__file__).resolve().parent / ".last_run.json"
RELIABILITY_SLOTS = 8
OK = grpc.StatusCode.OK
# Finish reasons a stream that was not cut short may end with.
COMPLETE_REASONS = (generation_pb2.FINISH_REASON_EOS, generation_pb2.FINISH_REASON_LENGTH,
                    generation_pb2.FINISH_REASON_STOP_SEQUENCE)


@dataclass
class StreamResult:
    """Everything a client saw of one Generate stream.

    `code` is OK when the stream ended without a status error; `finals` counts final messages and
    `after_final` counts messages that came after the first final (both must be 1 and 0).
    """

    code: grpc.StatusCode = OK
    details: str = ""
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    final: generation_pb2.Final | None = None
    finals: int = 0
    after_final: int = 0
    logprobs: int = 0  # TokenLogprobs entries received
    ttft: float | None = None  # seconds from sending to the first chunk, client side
    elapsed: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def completion_tokens(self) -> int:
        return self.final.usage.completion_tokens if self.final is not None else -1


async def run_stream(stub: generation_pb2_grpc.GenerationServiceStub, req: generation_pb2.GenerateRequest,
                     timeout: float = WAIT_SECONDS, metadata: Sequence[tuple[str, str]] = (),
                     started: asyncio.Event | None = None) -> StreamResult:
    """Reads one Generate stream to its end (bounded by `timeout`: a hung stream ends DEADLINE_EXCEEDED).

    Args:
        stub: the client stub.
        req: the request.
        timeout: the call's deadline in seconds.
        metadata: call metadata (e.g. the bearer token).
        started: set when the first chunk arrives (the stream is then live on the server).

    Returns:
        What arrived, and how the call ended.
    """
    out = StreamResult()
    start = time.perf_counter()
    call = stub.Generate(req, timeout=timeout, metadata=tuple(metadata))
    try:
        async for resp in call:
            if out.finals:
                out.after_final += 1
            if resp.HasField("chunk"):
                if out.ttft is None:
                    out.ttft = time.perf_counter() - start
                    if started is not None:
                        started.set()
                out.ids.extend(resp.chunk.token_ids)
                out.texts.append(resp.chunk.text)
                out.logprobs += len(resp.chunk.logprobs)
            elif resp.HasField("final"):
                out.finals += 1
                out.final = out.final or resp.final
    except grpc.aio.AioRpcError as err:
        out.code, out.details = err.code(), err.details() or ""
    out.elapsed = time.perf_counter() - start
    return out


def incomplete(r: StreamResult, req: generation_pb2.GenerateRequest, eos_ids: frozenset[int]) -> str | None:
    """Why an OK stream is not complete (None when it is): one final, nothing after it, as many ids as
    the final counts, and a finish reason its length agrees with.

    Args:
        r: the stream as received.
        req: the request it answered.
        eos_ids: the model's end-of-sequence ids.

    Returns:
        A description of the first problem, or None.
    """
    if r.code is not OK:
        return f"ended {r.code.name}: {r.details}"
    if r.finals != 1 or r.after_final or r.final is None:
        return f"{r.finals} final messages, {r.after_final} messages after the first"
    f = r.final
    if f.usage.completion_tokens != len(r.ids):
        return f"final counts {f.usage.completion_tokens} tokens, {len(r.ids)} ids arrived"
    if req.request_id and f.request_id != req.request_id:
        return f"final names request {f.request_id!r}"
    if f.finish_reason not in COMPLETE_REASONS:
        return f"finish reason {generation_pb2.FinishReason.Name(f.finish_reason)}"
    if req.HasField("max_new_tokens") and len(r.ids) > req.max_new_tokens:
        return f"{len(r.ids)} ids for max_new_tokens {req.max_new_tokens}"
    if f.finish_reason == generation_pb2.FINISH_REASON_LENGTH and len(r.ids) != req.max_new_tokens:
        return f"LENGTH after {len(r.ids)} of {req.max_new_tokens} tokens"
    if f.finish_reason == generation_pb2.FINISH_REASON_EOS and (not r.ids or r.ids[-1] not in eos_ids):
        return "EOS without an end-of-sequence id last"
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_bytes() -> int:
    """This process's resident set size now (not the peak, which ru_maxrss gives)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def record_figures(section: str, figures: dict[str, Any]) -> None:
    """Merges one test's figures into tests/reliability/.last_run.json (the run's closing-note numbers).

    Args:
        section: e.g. "load"; replaces that section of the file.
        figures: JSON-serialisable values.
    """
    data: dict[str, Any] = {}
    if FIGURES.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(FIGURES.read_text())
    data[section] = {**figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class SubmitCounter:
    """Counts `engine.submit` calls (each is engine work: a queue place, then a slot) and wakes waiters.

    Installed on one engine instance for one test through `monkeypatch`; submit runs on the event loop.
    """

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[str] = []
        self._changed = asyncio.Event()
        submit = engine.submit

        def counted(req: GenerationRequest, loop: asyncio.AbstractEventLoop | bool | None = True) -> RequestHandle:
            handle = submit(req, loop)  # raises QueueFull & co before it counts: only admitted work counts
            self.ids.append(req.request_id)
            self._changed.set()
            return handle

        monkeypatch.setattr(engine, "submit", counted)

    @property
    def count(self) -> int:
        return len(self.ids)

    async def until(self, n: int, timeout: float = WAIT_SECONDS) -> None:
        """Returns once at least `n` requests were submitted; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while len(self.ids) < n:
                self._changed.clear()
                await self._changed.wait()


class ScriptedModerator:
    """A fake guard backend: `behave(stage)` returns a Verdict, raises, or sleeps past the policy's timeout.

    Records every conversation it is asked about, so a test can rebuild what a real backend's prompt would
    have been.
    """

    def __init__(self, behave: Callable[[Stage], Awaitable[Verdict]]) -> None:
        self.behave = behave
        self.seen: list[tuple[tuple[Message, ...], Role, Stage]] = []

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        self.seen.append((tuple(conversation), role, stage))
        return await self.behave(stage)


async def judged_safe(stage: Stage) -> Verdict:
    return Verdict(safe=True, backend="scripted", stage=stage)


@contextlib.asynccontextmanager
async def guarded_front(base: Served, config: Config, moderator: Moderator) -> AsyncIterator[Served]:
    """Like tests/grpc/conftest.py `front()`, with `moderator` as the guard backend (wrapped by the policy's
    FailSafeModerator, so `config.guard` decides fail-open/closed and the timeout).

    Args:
        base: the server whose engine is shared.
        config: the front's config (guard policy, security); engine settings are ignored.
        moderator: the backend.

    Yields:
        The front, SERVING; stopped on exit.
    """
    app = build_app(config, base.engine, moderator=moderator)
    server = await start_server(config, app.generation, app.moderation, app.life, None)
    await server.set_serving(True)
    try:
        yield Served(app, server, base.watch)
    finally:
        await server.server.stop(0)


async def assert_idle(served: Served) -> None:
    """Waits (bounded) until no request holds a slot, then checks every slot and queue place is free."""
    await served.watch.until_idle()
    stats = served.engine.stats()
    assert (stats.running, stats.waiting, served.engine.kv.free_slots) == (0, 0, stats.slots)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def rel(model_dir: Path) -> AsyncIterator[Served]:
    """The suite's server: 8 slots, the default queue (64), a 1024-token window, no guard, no metrics."""
    s = await start_served(server_config(model_dir, "--max-slots", str(RELIABILITY_SLOTS), "--max-context",
                                         "1024"))
    yield s
    await s.server.drain()


@pytest_asyncio.fixture(loop_scope="session")
async def rel_stub(rel: Served) -> AsyncIterator[generation_pb2_grpc.GenerationServiceStub]:
    async with grpc.aio.insecure_channel(rel.target) as ch:
        yield generation_pb2_grpc.GenerationServiceStub(ch)
    await assert_idle(rel)  # every test leaves the shared engine as it found it


@dataclass
class Hostile:
    """A front over the suite's engine with an always-safe scripted guard (`moderator.seen`: what it was asked)."""

    served: Served
    moderator: ScriptedModerator
    stub: generation_pb2_grpc.GenerationServiceStub
    channel: grpc.aio.Channel


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hostile(rel: Served, model_dir: Path) -> AsyncIterator[Hostile]:
    """The hostile-input server (one per module): guard options accepted, 4 new tokens unless asked."""
    moderator = ScriptedModerator(judged_safe)
    # A default of 4 new tokens keeps the accepted hostile requests (and the fuzzed ones) cheap.
    config = server_config(model_dir, "--guard-backend", "classifier", "--default-max-new-tokens", "4")
    async with guarded_front(rel, config, moderator) as front, grpc.aio.insecure_channel(front.target) as ch:
        yield Hostile(front, moderator, generation_pb2_grpc.GenerationServiceStub(ch), ch)


async def assert_serving(h: Hostile) -> None:
    """A normal request still streams to a complete end."""
    req = generation_pb2.GenerateRequest(prompt="1, 2, 3,", max_new_tokens=3)
    assert incomplete(await run_stream(h.stub, req), req, h.served.engine.eos_ids) is None
