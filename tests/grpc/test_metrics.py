"""Metrics and request logs seen from the wire, on real grpc.aio servers on loopback port 0.

1. The call interceptor over a FAKE servicer (no model): every way a call can end (ok, internal error,
   queue full, unauthenticated, deadline, cancel, hang-up after the final message), streams timed over
   the whole stream, request ids.
2. The real server (`service.app.start`) with the real int4 model and a marker-word moderator: streaming,
   unary, a blocked prompt, a cancel and a bad request; then /metrics is scraped over HTTP, parsed with
   prometheus_client.parser and checked for exact counter deltas, histogram counts, `promtool check
   metrics`, and the dashboard's metric names.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guard.moderator import Message, Role, Stage, Verdict
from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from service.app import start
from service.config import Config, EngineConfig, GuardBackend, GuardConfig, ServerConfig
from service.errors import ErrorInterceptor, QueueFull
from service.grpc_metrics import CallEnd, CallInterceptor, RecordingSink
from service.logs import RequestLogger
from service.metrics import FINISH_REASONS, PrometheusSink, serve_metrics
from service.server import TokenAuthInterceptor
from service.stats import RequestRecord
from tests.unit.test_prometheus import DASHBOARD, dashboard_exprs, promql_metric_names, promtool

TOKEN = "metrics-test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GEN = {"grpc_service": "sluice.v1.GenerationService", "grpc_type": "server_stream", "grpc_method": "Generate"}
UNARY = {"grpc_service": "sluice.v1.GenerationService", "grpc_type": "unary"}
MARKER = "qwzx-forbidden"  # the fake moderator flags any turn containing it
SECRET = "marmalade"  # in every real prompt: must never reach a log line
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class WatchedSink(PrometheusSink):
    """A PrometheusSink the test can await: call ends arrive on the server's side, after the client's."""

    def __init__(self, registry: CollectorRegistry, guard_backend: str = "none") -> None:
        super().__init__(registry, guard_backend=guard_backend)
        self.ends: list[CallEnd] = []
        self._changed = asyncio.Event()

    def call_finished(self, end: CallEnd) -> None:
        super().call_finished(end)
        self.ends.append(end)
        self._changed.set()

    async def wait_ends(self, n: int) -> None:
        async with asyncio.timeout(30):
            while len(self.ends) < n:
                self._changed.clear()
                await self._changed.wait()


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body: bytes = resp.read()
    return body.decode()


def outcomes(samples: Samples, rpc: str) -> dict[str, float]:
    """Non-zero sluice_requests_total series of one RPC."""
    return {f: v for f in FINISH_REASONS if (v := value(samples, "sluice_requests_total", rpc=rpc, finish_reason=f))}


# -- 1. the interceptor over a fake servicer ------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Behaves by prompt; records like the pipeline does (through a RecordingSink) when it 'generates'."""

    def __init__(self, stats: RecordingSink, clock: FakeClock) -> None:
        self.stats = stats
        self.clock = clock

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if request.prompt == "boom":
            raise RuntimeError("a bug")
        if request.prompt == "full":
            raise QueueFull()
        if request.prompt == "hang":
            await context.send_initial_metadata(())  # tells the client the handler runs
            await asyncio.Event().wait()  # only a cancel or the deadline ends this
        yield generation_pb2.GenerateResponse(chunk=generation_pb2.TokenChunk(text="a", token_ids=[1]))
        self.clock.now += 10.0  # "generating" takes 10 s of the fake clock, after the first message was sent
        self.stats.record_request(RequestRecord("Generate", "length", prompt_tokens=2, completion_tokens=1))
        yield generation_pb2.GenerateResponse(final=generation_pb2.Final(request_id=request.request_id or "srv-1"))
        if request.prompt == "linger":
            await asyncio.Event().wait()  # still closing when the client, holding its final, cancels

    async def Complete(self, request: generation_pb2.CompleteRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.CompleteResponse:
        self.stats.record_request(RequestRecord("Complete", "eos", prompt_tokens=2, completion_tokens=1))
        return generation_pb2.CompleteResponse(final=generation_pb2.Final(request_id="srv-2"))


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[generation_pb2_grpc.GenerationServiceStub, WatchedSink]]:
    sink = WatchedSink(CollectorRegistry())
    clock = FakeClock()
    server = grpc.aio.server(interceptors=[CallInterceptor([sink, RequestLogger()], clock=clock),
                                           ErrorInterceptor(), TokenAuthInterceptor(TOKEN)])
    fake = FakeGeneration(RecordingSink(sink), clock)  # type: ignore[abstract]  # Tokenize etc. unused here
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel), sink
    await server.stop(None)


async def generate_code(stub: generation_pb2_grpc.GenerationServiceStub, prompt: str,
                        metadata: Sequence[tuple[str, str]] = AUTH, timeout: float | None = None,
                        request_id: str = "") -> grpc.StatusCode:
    call = stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, request_id=request_id),
                         metadata=metadata, timeout=timeout)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    code: grpc.StatusCode = await call.code()
    return code


async def test_every_way_a_call_ends_is_counted_once(
        fake_server: tuple[generation_pb2_grpc.GenerationServiceStub, WatchedSink],
        caplog: pytest.LogCaptureFixture) -> None:
    stub, sink = fake_server
    caplog.set_level(logging.INFO, logger="sluice.request")
    assert await generate_code(stub, "ok") is grpc.StatusCode.OK
    assert await generate_code(stub, "ok", request_id="cli-1") is grpc.StatusCode.OK
    assert await generate_code(stub, "boom") is grpc.StatusCode.INTERNAL
    assert await generate_code(stub, "full") is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await generate_code(stub, "ok", metadata=()) is grpc.StatusCode.UNAUTHENTICATED
    assert await generate_code(stub, "hang", timeout=0.3) is grpc.StatusCode.DEADLINE_EXCEEDED
    hanging = stub.Generate(generation_pb2.GenerateRequest(prompt="hang"), metadata=AUTH)
    await hanging.initial_metadata()  # the handler is running
    hanging.cancel()
    await stub.Complete(generation_pb2.CompleteRequest(prompt="x"), metadata=AUTH)
    await sink.wait_ends(8)

    s = parse(scrape_registry(sink))
    assert outcomes(s, "Generate") == {"length": 2, "error": 1, "rejected": 2, "deadline": 1, "cancelled": 1}
    assert outcomes(s, "Complete") == {"eos": 1}
    assert value(s, "grpc_server_started_total", **GEN) == 7
    handled = {c: value(s, "grpc_server_handled_total", grpc_code=c, **GEN)
               for c in ("OK", "Internal", "ResourceExhausted", "Unauthenticated", "DeadlineExceeded", "Canceled")}
    assert handled == {"OK": 2, "Internal": 1, "ResourceExhausted": 1, "Unauthenticated": 1,
                       "DeadlineExceeded": 1, "Canceled": 1}
    assert value(s, "grpc_server_handled_total", grpc_code="OK", grpc_method="Complete", **UNARY) == 1
    ids = [r.__dict__["request_id"] for r in caplog.records if r.__dict__.get("grpc_code") == "OK"]
    assert sorted(ids) == ["cli-1", "srv-1", "srv-2"]  # the client's id, else the one the server echoed


def scrape_registry(sink: PrometheusSink) -> str:
    return generate_latest(sink.registry).decode()


async def test_streams_are_timed_over_the_whole_stream(
        fake_server: tuple[generation_pb2_grpc.GenerationServiceStub, WatchedSink]) -> None:
    stub, sink = fake_server
    assert await generate_code(stub, "ok") is grpc.StatusCode.OK
    await sink.wait_ends(1)
    s = parse(scrape_registry(sink))
    assert value(s, "grpc_server_handling_seconds_sum", **GEN) == 10.0  # the fake clock moved between messages


async def test_hanging_up_after_the_final_message_is_a_completed_call(
        fake_server: tuple[generation_pb2_grpc.GenerationServiceStub, WatchedSink]) -> None:
    stub, sink = fake_server
    call = stub.Generate(generation_pb2.GenerateRequest(prompt="linger"), metadata=AUTH)
    async for response in call:
        if response.HasField("final"):
            break
    call.cancel()  # as a client does that stops reading at the final message
    await sink.wait_ends(1)
    assert sink.ends[0].code is grpc.StatusCode.OK and sink.ends[0].record is not None
    assert outcomes(parse(scrape_registry(sink)), "Generate") == {"length": 1}


# -- 2. the real server, the real model --------------------------------------------------------------------

class MarkerModerator:
    """Flags any judged turn containing MARKER as S1 (a fake guard: the metrics are under test, not it)."""

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        unsafe = MARKER in conversation[-1].content
        return Verdict(not unsafe, ("S1",) if unsafe else (), 1.0 if unsafe else 0.0, "marker", stage, 0.001)


def request(prompt: str, max_new_tokens: int, request_id: str = "", guard: common_pb2.GuardOptions | None = None,
            sampling: generation_pb2.SamplingParams | None = None) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=f"{prompt} {SECRET}", max_new_tokens=max_new_tokens,
                                          request_id=request_id, guard=guard, sampling=sampling)


async def read_stream(call: grpc.aio.UnaryStreamCall) -> tuple[int, generation_pb2.Final]:
    chunks = 0
    async for r in call:
        if r.HasField("final"):
            return chunks, r.final
        chunks += 1
    raise AssertionError("stream ended without a final message")


async def test_real_traffic_moves_the_metrics_by_exact_amounts(
        model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.request")
    # a configured backend, so per-request guard options are accepted; start() uses the moderator passed in
    config = Config(server=ServerConfig(port=0), guard=GuardConfig(backend=GuardBackend.CLASSIFIER),
                    engine=EngineConfig(model=model_dir, max_slots=2, intra_op_threads=1))
    sink = WatchedSink(CollectorRegistry(), guard_backend="marker")
    endpoint = serve_metrics(sink.registry, "127.0.0.1", 0)
    app, server = await start(config, stats=sink, moderator=MarkerModerator())
    get = functools.partial(scrape, endpoint.port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            before = parse(await asyncio.to_thread(get))  # after warmup: the engine counters are not at 0
            counting = f"1, 2, 3, 4, 5, 6, 7, 8, {SECRET},"
            tokens = await stub.Tokenize(generation_pb2.TokenizeRequest(prompt=f"{counting} {SECRET}"))

            cancelled = stub.Generate(request(counting, 400))
            first = await cancelled.read()
            assert first.HasField("chunk")
            during = parse(await asyncio.to_thread(get))
            cancelled.cancel()
            await sink.wait_ends(2)

            small_window = common_pb2.GuardOptions(release_window_tokens=4)  # several releases, so ITL has gaps
            n_chunks, stream_final = await read_stream(stub.Generate(request(
                "The capital of France is", 12, request_id="rid-stream", guard=small_window)))
            unary = await stub.Complete(generation_pb2.CompleteRequest(prompt=f"Once upon a time {SECRET}",
                                                                       max_new_tokens=5))
            _, blocked = await read_stream(stub.Generate(request(f"how do I {MARKER}", 8)))
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await read_stream(stub.Generate(request("hi", 4, sampling=generation_pb2.SamplingParams(top_p=1.5))))
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            await sink.wait_ends(6)
            text = await asyncio.to_thread(get)
    finally:
        await server.drain()
        endpoint.close()

    after = parse(text)
    assert value(during, "sluice_requests_running") == 1 and value(during, "sluice_kv_cache_usage_ratio") > 0
    assert blocked.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    reason = {generation_pb2.FINISH_REASON_EOS: "eos", generation_pb2.FINISH_REASON_LENGTH: "length"}
    expected_generate = {"cancelled": 1, "content_filter": 1, "rejected": 1}
    expected_generate[reason[stream_final.finish_reason]] = 1
    assert outcomes(after, "Generate") == expected_generate
    assert outcomes(after, "Complete") == {reason[unary.final.finish_reason]: 1}

    assert value(after, "grpc_server_started_total", **GEN) == 4
    assert {c: value(after, "grpc_server_handled_total", grpc_code=c, **GEN)
            for c in ("OK", "Canceled", "InvalidArgument")} == {"OK": 2, "Canceled": 1, "InvalidArgument": 1}
    for method in ("Complete", "Tokenize"):
        assert value(after, "grpc_server_handled_total", grpc_code="OK", grpc_method=method, **UNARY) == 1
    assert value(after, "grpc_server_handling_seconds_count", **GEN) == 4

    # histograms: only requests the pipeline finished (stream, unary, blocked); TTFT only where text flowed
    assert value(after, "sluice_e2e_request_latency_seconds_count") == 3
    assert value(after, "sluice_time_to_first_token_seconds_count") == 2
    assert value(after, "sluice_request_queue_time_seconds_count") == 2
    assert n_chunks >= 2 and value(after, "sluice_inter_token_latency_seconds_count") >= n_chunks - 1
    prompts = stream_final.usage.prompt_tokens + unary.final.usage.prompt_tokens + blocked.usage.prompt_tokens
    assert value(after, "sluice_request_prompt_tokens_sum") == prompts
    completions = stream_final.usage.completion_tokens + unary.final.usage.completion_tokens
    assert value(after, "sluice_request_generation_tokens_sum") == completions

    # engine counters: the prompts that reached the engine (cancelled yes; blocked and bad no)
    delta = {n: value(after, n) - value(before, n) for n in ("sluice_prompt_tokens_total",
                                                            "sluice_generation_tokens_total")}
    reached = tokens.token_count + stream_final.usage.prompt_tokens + unary.final.usage.prompt_tokens
    assert delta["sluice_prompt_tokens_total"] == reached
    assert delta["sluice_generation_tokens_total"] >= completions + 1
    assert (value(after, "sluice_requests_running"), value(after, "sluice_requests_waiting")) == (0, 0)
    assert value(after, "sluice_model_info", model=app.engine.spec.name, precision="int4", guard_backend="marker") == 1

    # guard: four prompts judged at the input, one blocked; output verdicts only safe
    assert value(after, "sluice_guard_decisions_total", stage="input", verdict="safe", category="none") == 3
    assert value(after, "sluice_guard_decisions_total", stage="input", verdict="unsafe", category="S1") == 1
    output = {k: v for k, v in after.items() if k[0] == "sluice_guard_decisions_total" and ("stage", "output") in k[1]}
    assert set(output) == {("sluice_guard_decisions_total",
                            (("category", "none"), ("stage", "output"), ("verdict", "safe")))}
    assert sum(output.values()) == value(after, "sluice_guard_latency_seconds_count", stage="output") >= 2
    assert value(after, "process_cpu_seconds_total") > 0

    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {k[0] for k in after}
    assert set().union(*(promql_metric_names(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text())))) <= names

    lines = [r for r in caplog.records if r.name == "sluice.request"]
    assert sorted(r.__dict__["grpc_code"] for r in lines) == ["CANCELLED", "INVALID_ARGUMENT", "OK", "OK", "OK", "OK"]
    assert any(r.__dict__["request_id"] == "rid-stream" and r.__dict__["completion_tokens"] > 0 for r in lines)
    assert all(SECRET not in r.getMessage() and SECRET not in str(r.__dict__) for r in caplog.records)
