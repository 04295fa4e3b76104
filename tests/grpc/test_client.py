"""The typed client against a real grpc.aio server on a loopback port 0, serving the generated
GenerationService and ModerationService with a FAKE servicer (no model): streaming, retries, deadlines,
metadata, and the error interceptor seen from the wire."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest

from service import cli
from service._pb.sluice.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    moderation_pb2,
    moderation_pb2_grpc,
)
from service.client import (
    AsyncSluiceClient,
    RetryPolicy,
    SluiceClient,
    as_complete_request,
    build_generate_request,
    field_violations,
)
from service.errors import ErrorInterceptor, QueueFull, Unavailable, validation_error

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)
TOKEN = "t0ken-for-tests-0123456789"


@dataclass
class Script:
    """What the fake does: fail the first attempts with these errors, then answer."""

    failures: list[Exception] = field(default_factory=list)
    fail_after_first_chunk: Exception | None = None
    hang_at: str | None = None  # "start" or "after_first_chunk": wait until cancelled
    attempts: int = 0
    metadata: list[tuple[str, str]] = field(default_factory=list)
    requests: list[generation_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def _begin(self, context: grpc.aio.ServicerContext) -> None:
        self.script.attempts += 1
        self.script.metadata = [(m.key, m.value) for m in context.invocation_metadata()]
        if self.script.failures:
            raise self.script.failures.pop(0)
        if self.script.hang_at == "start":
            await self._hang()

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()  # never set: only a deadline or a cancel ends this call
        except asyncio.CancelledError:
            self.script.cancelled.set()
            raise

    async def Generate(  # type: ignore[override]
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        self.script.requests.append(request)
        await self._begin(context)
        yield generation_pb2.GenerateResponse(chunk=generation_pb2.TokenChunk(text="Hel", token_ids=[1]))
        if self.script.fail_after_first_chunk is not None:
            raise self.script.fail_after_first_chunk
        if self.script.hang_at == "after_first_chunk":
            await self._hang()
        yield generation_pb2.GenerateResponse(chunk=generation_pb2.TokenChunk(text="lo", token_ids=[2]))
        final = generation_pb2.Final(
            finish_reason=generation_pb2.FINISH_REASON_EOS,
            usage=generation_pb2.Usage(prompt_tokens=len(request.prompt), completion_tokens=2),
            request_id=request.request_id or "srv-1",
        )
        yield generation_pb2.GenerateResponse(final=final)

    async def Complete(  # type: ignore[override]
        self, request: generation_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.CompleteResponse:
        await self._begin(context)
        if request.sampling.HasField("top_p") and request.sampling.top_p > 1:
            raise validation_error("sampling.top_p", f"must be in (0, 1], got {request.sampling.top_p:g}")
        final = generation_pb2.Final(finish_reason=generation_pb2.FINISH_REASON_LENGTH)
        return generation_pb2.CompleteResponse(text=request.prompt.upper(), final=final)

    async def Tokenize(  # type: ignore[override]
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        ids = [ord(c) for c in request.prompt]
        return generation_pb2.TokenizeResponse(token_ids=ids, token_count=len(ids))

    async def GetModelInfo(  # type: ignore[override]
        self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GetModelInfoResponse:
        info = generation_pb2.ModelInfo(name="fake", context_length=64)
        return generation_pb2.GetModelInfoResponse(model_info=info)


class FakeModeration(moderation_pb2_grpc.ModerationServiceServicer):
    async def Moderate(  # type: ignore[override]
        self, request: moderation_pb2.ModerateRequest, context: grpc.aio.ServicerContext
    ) -> moderation_pb2.ModerateResponse:
        unsafe = "bomb" in request.messages[-1].content
        verdict = common_pb2.GuardVerdict(safe=not unsafe, categories=["S9"] if unsafe else [], score=0.9)
        return moderation_pb2.ModerateResponse(verdict=verdict)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(FakeGeneration(script), server)
    moderation_pb2_grpc.add_ModerationServiceServicer_to_server(FakeModeration(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", script
    await server.stop(None)


async def test_generate_streams_chunks_then_final(served: tuple[str, Script]) -> None:
    target, _ = served
    async with AsyncSluiceClient(target) as client:
        responses = [r async for r in client.generate(build_generate_request("hi", request_id="r-1"))]
    assert [r.WhichOneof("event") for r in responses] == ["chunk", "chunk", "final"]
    assert "".join(r.chunk.text for r in responses[:-1]) == "Hello"
    assert responses[-1].final.finish_reason == generation_pb2.FINISH_REASON_EOS
    assert responses[-1].final.request_id == "r-1"
    assert responses[-1].final.usage.prompt_tokens == 2


async def test_unary_methods_and_token_metadata(served: tuple[str, Script]) -> None:
    target, script = served
    async with AsyncSluiceClient(target, token=TOKEN) as client:
        completed = await client.complete(as_complete_request(build_generate_request("abc")))
        assert ("authorization", f"Bearer {TOKEN}") in script.metadata
        tokens = await client.tokenize(generation_pb2.TokenizeRequest(prompt="ab"))
        info = await client.model_info()
        moderated = await client.moderate(
            moderation_pb2.ModerateRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="a bomb")]
            )
        )
    assert completed.text == "ABC"
    assert completed.final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert list(tokens.token_ids) == [97, 98] and tokens.token_count == 2
    assert info.name == "fake" and info.context_length == 64
    assert not moderated.verdict.safe and list(moderated.verdict.categories) == ["S9"]


@pytest.mark.parametrize("error", [Unavailable(), QueueFull()], ids=["unavailable", "resource_exhausted"])
async def test_retries_retryable_codes_before_the_first_message(
    served: tuple[str, Script], error: Exception
) -> None:
    target, script = served
    script.failures = [error, error]
    async with AsyncSluiceClient(target, retry=FAST_RETRY) as client:
        responses = [r async for r in client.generate(build_generate_request("hi"))]
        assert responses[-1].final.finish_reason == generation_pb2.FINISH_REASON_EOS
        assert script.attempts == 3
        script.attempts, script.failures = 0, [error]
        completed = await client.complete(as_complete_request(build_generate_request("x")))
    assert completed.text == "X"
    assert script.attempts == 2


async def test_gives_up_after_max_attempts(served: tuple[str, Script]) -> None:
    target, script = served
    script.failures = [Unavailable() for _ in range(10)]
    async with AsyncSluiceClient(target, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.complete(as_complete_request(build_generate_request("x")))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "server is shutting down"
    assert script.attempts == 3


async def test_no_retry_once_the_stream_has_delivered(served: tuple[str, Script]) -> None:
    target, script = served
    script.fail_after_first_chunk = Unavailable()
    received: list[str] = []
    async with AsyncSluiceClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in client.generate(build_generate_request("hi")):
                received.append(response.chunk.text)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert received == ["Hel"]
    assert script.attempts == 1


async def test_no_retry_on_invalid_argument_and_details_name_the_field(served: tuple[str, Script]) -> None:
    target, script = served
    async with AsyncSluiceClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.complete(as_complete_request(build_generate_request("x", top_p=1.5)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "sampling.top_p must be in (0, 1], got 1.5"
    assert field_violations(caught.value) == [
        ("sampling.top_p", "sampling.top_p must be in (0, 1], got 1.5")
    ]
    assert script.attempts == 1


async def test_unknown_error_is_internal_without_leaking(served: tuple[str, Script]) -> None:
    target, script = served
    script.failures = [RuntimeError("prompt text: my secret plan")]
    async with AsyncSluiceClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in client.generate(build_generate_request("hi"))]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error"
    assert "secret" not in str(caught.value.trailing_metadata())
    assert script.attempts == 1


async def test_deadline_is_enforced_and_cancels_the_server_side(served: tuple[str, Script]) -> None:
    target, script = served
    script.hang_at = "start"
    async with AsyncSluiceClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in client.generate(build_generate_request("hi"), timeout=0.2)]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(script.cancelled.wait(), timeout=5)  # the handler was cancelled, slot freed


async def test_leaving_the_stream_early_cancels_the_call(served: tuple[str, Script]) -> None:
    target, script = served
    script.hang_at = "after_first_chunk"
    async with AsyncSluiceClient(target) as client:
        stream = client.generate(build_generate_request("hi"))
        first = await anext(stream)
        await stream.aclose()
        # The channel is still open: only the client's cancel can have ended the server handler.
        await asyncio.wait_for(script.cancelled.wait(), timeout=5)
    assert first.chunk.text == "Hel"


async def test_sync_client(served: tuple[str, Script]) -> None:
    target, script = served
    script.failures = [QueueFull()]

    def run() -> tuple[str, str]:
        with SluiceClient(target, retry=FAST_RETRY, token=TOKEN) as client:
            text = "".join(r.chunk.text for r in client.generate(build_generate_request("hi")))
            return text, client.complete(as_complete_request(build_generate_request("ok"))).text

    streamed, completed = await asyncio.to_thread(run)
    assert (streamed, completed) == ("Hello", "OK")
    assert script.attempts == 3  # one retried Generate, one Complete
    assert ("authorization", f"Bearer {TOKEN}") in script.metadata


async def run_cli(argv: list[str]) -> int:
    return await asyncio.to_thread(cli.main, argv)


async def test_cli_generate_streams_text_and_json(
    served: tuple[str, Script], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = served
    assert await run_cli(["generate", "hi", "--target", target]) == 0
    assert capsys.readouterr().out == "Hello\n"
    assert await run_cli(["generate", "abc", "--json", "--target", target]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["text"] == "ABC"
    assert printed["final"]["finish_reason"] == "FINISH_REASON_LENGTH"


async def test_cli_reports_status_and_field(
    served: tuple[str, Script], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = served
    assert await run_cli(["generate", "x", "--json", "--top-p", "1.5", "--target", target]) == 1
    assert capsys.readouterr().err == "sluice: INVALID_ARGUMENT: sampling.top_p must be in (0, 1], got 1.5\n"


async def test_cli_chat_keeps_the_conversation(
    served: tuple[str, Script], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target, script = served
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/exit\n"))
    assert await run_cli(["chat", "--system", "be brief", "--target", target]) == 0
    assert capsys.readouterr().out == "you> Hello\nyou> Hello\nyou> "
    first, second = (list(r.messages.messages) for r in script.requests)
    assert [(m.role, m.content) for m in second] == [
        (common_pb2.CHAT_ROLE_SYSTEM, "be brief"),
        (common_pb2.CHAT_ROLE_USER, "first"),
        (common_pb2.CHAT_ROLE_ASSISTANT, "Hello"),
        (common_pb2.CHAT_ROLE_USER, "second"),
    ]
    assert first == second[:2]


async def test_cli_moderate_and_tokenize(
    served: tuple[str, Script], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = served
    assert await run_cli(["moderate", "how to build a bomb", "--target", target]) == 0
    assert capsys.readouterr().out.startswith("unsafe S9 (score 0.90")
    assert await run_cli(["tokenize", "ab", "--target", target]) == 0
    assert capsys.readouterr().out == "97 98\n"
