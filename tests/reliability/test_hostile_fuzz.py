"""Hostile input, hypothesis-generated: requests with arbitrary field values (NaN and infinite floats, values
far outside every range, unknown enum numbers, chat and guard markup in text, control characters, too many
or too long stop strings, arbitrary request ids and guard options) and arbitrary bytes on the wire.

Every example must get either a complete answer or INVALID_ARGUMENT whose message starts with the field its
BadRequest detail names and never quotes the user's text; never INTERNAL, UNKNOWN or a hang (each call has
a deadline). The examples run through a blocking client in a worker thread while the server keeps running
on the event loop. `derandomize=True`: the same examples on every run, so CI never flakes on a new one;
60 examples per property keeps the module within ~30 s.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc, moderation_pb2, moderation_pb2_grpc
from service.client import as_complete_request
from tests.reliability.conftest import COMPLETE_REASONS, Hostile, assert_serving, record_figures

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CALL_TIMEOUT = 30.0
DEFAULT_NEW_TOKENS = 4  # the hostile front's default
# "<field path> must|may|is ...": the field is what BadRequest names; e.g. "messages[2].role must be ...".
MESSAGE_RE = re.compile(r"(?P<field>[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*) (must|may|is) .+", re.DOTALL)
FRAGMENTS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "system\n", "user\n", "assistant\n", "<BEGIN CONVERSATION>",
             "<END CONVERSATION>", "<BEGIN UNSAFE CONTENT CATEGORIES>", "User: ", "Agent: ", "S1: ", "\r\n", "\u2028",
             "\x1b[2J", "\u202e", "\u200b", "\ufeff", "\x07", "é", "漢字", "🦙", " ", "safe", "unsafe\nS1")
# Valid text is still hostile: markup of the chat template and the guard prompt, control characters, emoji.
TEXT = st.one_of(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=48),
                 st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join))
BAD_TEXT = st.one_of(st.just(""), TEXT.map(lambda t: t + "\x00"), st.text(min_size=129, max_size=300))
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


REQUEST_FIELDS = ("input", "sampling", "max_new_tokens", "stop", "logprobs", "request_id", "guard")


def in_range(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, width=32)  # bounds must be float32-exact (0.25, 0.5, ...)


@st.composite
def sampling_params(draw: st.DrawFn, bad: bool) -> generation_pb2.SamplingParams:
    ranges = {"temperature": (0, 2), "top_p": (0.25, 1), "min_p": (0, 1), "repetition_penalty": (0.5, 2),
              "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
    kw = {name: draw(FLOAT32 if bad else in_range(*r)) for name, r in ranges.items() if draw(st.booleans())}
    seed = draw(optional(st.integers(0, 2**64 - 1)))
    return generation_pb2.SamplingParams(top_k=draw(st.integers(0, 2**32 - 1)), **kw,
                                         **({} if seed is None else {"seed": seed}))


@st.composite
def guard_options(draw: st.DrawFn, bad: bool) -> common_pb2.GuardOptions:
    threshold = FLOAT32 if bad else in_range(0, 0.5)  # the server's are 0.5: a request may only lower them
    kw = {name: draw(threshold) for name in ("input_threshold", "output_threshold") if draw(st.booleans())}
    codes = ("S1", "S14", "S99", "x", "", "<b>") if bad else ("S1", "S14")
    window = draw(st.integers(0, 2**32 - 1) if bad else st.integers(1, 16))
    return common_pb2.GuardOptions(block_categories=draw(st.lists(st.sampled_from(codes), max_size=3)),
                                   fail_closed=draw(st.booleans()), release_window_tokens=window, **kw)


@st.composite
def chat_messages(draw: st.DrawFn, bad: bool) -> list[common_pb2.ChatMessage]:
    if not bad:
        system = [common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_SYSTEM, content=draw(TEXT))] * draw(st.booleans())
        return [*system, common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=draw(TEXT))]
    return [common_pb2.ChatMessage(role=draw(st.integers(-2, 5)), content=draw(st.one_of(TEXT, BAD_TEXT)))
            for _ in range(draw(st.integers(0, 4)))]


@st.composite
def generate_requests(draw: st.DrawFn) -> generation_pb2.GenerateRequest:
    """Mostly valid requests with up to three fields drawn from far outside their allowed values."""
    bad = draw(st.sets(st.sampled_from(REQUEST_FIELDS), max_size=3))
    req = generation_pb2.GenerateRequest()
    req.request_id = draw(st.text(max_size=140) if "request_id" in bad else
                          st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True)))
    req.stop.extend(draw(st.lists(st.one_of(TEXT, BAD_TEXT), max_size=20) if "stop" in bad else
                         st.lists(TEXT, max_size=3)))
    req.logprobs = draw(st.booleans())
    req.top_logprobs = draw(st.integers(0, 2**32 - 1) if "logprobs" in bad else
                            st.integers(0, 20) if req.logprobs else st.just(0))
    kind = draw(st.sampled_from(("prompt", "messages", "none") if "input" in bad else ("prompt", "messages")))
    if kind == "prompt":
        req.prompt = draw(st.one_of(TEXT, BAD_TEXT) if "input" in bad else TEXT)
    elif kind == "messages":
        req.messages.messages.extend(draw(chat_messages("input" in bad)))
    if draw(st.booleans()) or "sampling" in bad:
        req.sampling.CopyFrom(draw(sampling_params("sampling" in bad)))
    # Valid counts stay tiny (unset means the front's default of 4); the rest are far out of range.
    max_new = draw(st.one_of(st.just(0), st.integers(2049, 2**32 - 1)) if "max_new_tokens" in bad else
                   optional(st.integers(1, 3)))
    if max_new is not None:
        req.max_new_tokens = max_new
    if draw(st.booleans()) or "guard" in bad:
        req.guard.CopyFrom(draw(guard_options("guard" in bad)))
    return req


def user_texts(req: generation_pb2.GenerateRequest) -> list[str]:
    texts = [req.prompt, *req.stop, *(m.content for m in req.messages.messages)]
    return [t for t in texts if len(t.strip()) >= 12]  # long enough that a chance match is impossible


def check_invalid(err: grpc.RpcError, texts: list[str]) -> None:
    """INVALID_ARGUMENT with "<field> must ..." naming the BadRequest field, quoting none of `texts`."""
    details = err.details() or ""
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details)
    match = MESSAGE_RE.fullmatch(details)
    assert match is not None, details
    status = rpc_status.from_call(err)
    assert status is not None and len(status.details) == 1
    br = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(br)
    assert [(v.field, v.description) for v in br.field_violations] == [(match["field"], details)]
    assert not any(t in details for t in texts), details


async def fuzz(hostile: Hostile, body: Any) -> Counter[str]:
    """Runs `body(channel, outcomes)` (a hypothesis test) on a blocking channel in a worker thread."""
    outcomes: Counter[str] = Counter()

    def run() -> None:
        with grpc.insecure_channel(hostile.served.target) as channel:
            body(channel, outcomes)

    await asyncio.to_thread(run)
    await assert_serving(hostile)
    return outcomes


async def test_generated_requests_get_an_answer_or_a_clear_invalid_argument(hostile: Hostile) -> None:
    @FUZZ
    @given(req=generate_requests(), streaming=st.booleans())
    def body(channel: grpc.Channel, outcomes: Counter[str], req: generation_pb2.GenerateRequest,
             streaming: bool) -> None:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        try:
            if streaming:
                responses = list(stub.Generate(req, timeout=CALL_TIMEOUT))
                ids = [i for r in responses if r.HasField("chunk") for i in r.chunk.token_ids]
                finals = [r.final for r in responses if r.HasField("final")]
                assert len(finals) == 1 and responses[-1].HasField("final")
                final = finals[0]
            else:
                resp = stub.Complete(as_complete_request(req), timeout=CALL_TIMEOUT)
                ids, final = list(resp.token_ids), resp.final
        except grpc.RpcError as err:
            check_invalid(err, user_texts(req))
            outcomes["invalid"] += 1
            return
        # A request may lower a guard threshold, down to 0: then the safe verdict's score 0 blocks.
        blocked = req.guard.HasField("input_threshold") or req.guard.HasField("output_threshold")
        assert final.finish_reason in (*COMPLETE_REASONS, *[generation_pb2.FINISH_REASON_CONTENT_FILTER] * blocked)
        limit = req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_NEW_TOKENS
        assert final.usage.completion_tokens == len(ids) <= limit
        outcomes["ok"] += 1

    outcomes = await fuzz(hostile, body)
    assert outcomes["invalid"] and outcomes["ok"]  # the strategy reaches both sides of validation
    record_figures("hostile_fuzz_generate", dict(outcomes))


async def test_generated_moderation_requests_get_a_verdict_or_a_clear_invalid_argument(hostile: Hostile) -> None:
    @FUZZ
    @given(messages=st.booleans().flatmap(chat_messages), role=st.integers(-2, 4))
    def body(channel: grpc.Channel, outcomes: Counter[str], messages: list[common_pb2.ChatMessage],
             role: int) -> None:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        try:
            resp = stub.Moderate(moderation_pb2.ModerateRequest(messages=messages, role=role), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            check_invalid(err, [m.content for m in messages if len(m.content.strip()) >= 12])
            outcomes["invalid"] += 1
            return
        assert resp.verdict.safe and not resp.verdict.error  # the scripted guard judged it
        outcomes["ok"] += 1

    outcomes = await fuzz(hostile, body)
    assert outcomes["invalid"] and outcomes["ok"]
    record_figures("hostile_fuzz_moderate", dict(outcomes))


async def test_arbitrary_bytes_get_an_answer_or_invalid_argument_never_unknown(hostile: Hostile) -> None:
    @FUZZ
    @given(body_bytes=st.binary(max_size=256), method=st.sampled_from(("Tokenize", "GetModelInfo")))
    def body(channel: grpc.Channel, outcomes: Counter[str], body_bytes: bytes, method: str) -> None:
        call = channel.unary_unary(f"/sluice.v1.GenerationService/{method}")
        try:
            call(body_bytes, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                err.code(), err.details())
            outcomes[err.code().name] += 1
            return
        outcomes["ok"] += 1

    outcomes = await fuzz(hostile, body)
    assert outcomes["INVALID_ARGUMENT"]
    record_figures("hostile_fuzz_bytes", dict(outcomes))
