"""proto <-> domain conversions (`from_proto` / `to_proto`), so the servicer stays a few lines per RPC."""

from __future__ import annotations

import time
from collections.abc import Sequence

from guard.moderator import Message, Role, Verdict
from guard.policy import PolicyOptions
from service._pb.sluice.v1 import common_pb2, generation_pb2, moderation_pb2
from service.engine.types import FinishReason, SamplingParams, TokenEvent, TokenLogprob
from service.pipeline import Chunk, Final, GenerateCommand
from service.validation import GenerationRequestPb

_ROLE_NAMES = {
    common_pb2.CHAT_ROLE_SYSTEM: "system",
    common_pb2.CHAT_ROLE_USER: "user",
    common_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}
_FINISH = {
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: generation_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CONTENT_FILTER: generation_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: generation_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
}
MODERATION_ROLES = {moderation_pb2.MODERATION_ROLE_USER: Role.USER, moderation_pb2.MODERATION_ROLE_AGENT: Role.AGENT}


def messages_from_proto(messages: Sequence[common_pb2.ChatMessage]) -> tuple[Message, ...]:
    return tuple(Message(_ROLE_NAMES[m.role], m.content) for m in messages)


def policy_options_from_proto(g: common_pb2.GuardOptions) -> PolicyOptions:
    return PolicyOptions(
        block_categories=tuple(g.block_categories),
        input_threshold=g.input_threshold if g.HasField("input_threshold") else None,
        output_threshold=g.output_threshold if g.HasField("output_threshold") else None,
        release_window_tokens=g.release_window_tokens if g.HasField("release_window_tokens") else None,
        fail_open=False if g.fail_closed else None,
        stop_on_first_flag=g.stop_on_first_flag,
    )


def sampling_from_proto(p: generation_pb2.SamplingParams, logprobs: bool, top_logprobs: int) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_k=p.top_k,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed if p.HasField("seed") else None,
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
    )


def command_from_proto(req: GenerationRequestPb, rpc: str, default_max_new_tokens: int,
                       time_remaining: float | None, request_id: str) -> GenerateCommand:
    """Args:
    req: a validated GenerateRequest / CompleteRequest.
    rpc: "Generate" or "Complete".
    default_max_new_tokens: used when the request leaves it unset.
    time_remaining: seconds until the client's deadline, or None.
    request_id: the client's id, or one the server made.
    """
    is_prompt = req.WhichOneof("input") == "prompt"
    return GenerateCommand(
        request_id=request_id,
        prompt=req.prompt if is_prompt else None,
        messages=() if is_prompt else messages_from_proto(req.messages.messages),
        sampling=sampling_from_proto(req.sampling, req.logprobs, req.top_logprobs),
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else default_max_new_tokens,
        stop=tuple(req.stop),
        guard=policy_options_from_proto(req.guard),
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
        arrival=time.perf_counter(),
        rpc=rpc,
    )


def verdict_to_proto(v: Verdict | None) -> common_pb2.GuardVerdict | None:
    if v is None:
        return None
    return common_pb2.GuardVerdict(safe=v.safe, categories=list(v.categories), score=v.score, backend=v.backend,
                                   latency_seconds=v.latency, error=v.error)


def _logprob(lp: TokenLogprob) -> generation_pb2.Logprob:
    return generation_pb2.Logprob(token_id=lp.token_id, logprob=lp.logprob, text=lp.text)


def logprobs_to_proto(events: Sequence[TokenEvent]) -> list[generation_pb2.TokenLogprobs]:
    return [generation_pb2.TokenLogprobs(chosen=_logprob(e.logprob), top=[_logprob(t) for t in e.top_logprobs])
            for e in events if e.logprob is not None]


def chunk_to_proto(c: Chunk) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(chunk=generation_pb2.TokenChunk(
        text=c.text, token_ids=[e.token_id for e in c.events if e.token_id is not None],
        logprobs=logprobs_to_proto(c.events)))


def final_to_proto(f: Final) -> generation_pb2.Final:
    return generation_pb2.Final(
        finish_reason=_FINISH[f.finish_reason],
        usage=generation_pb2.Usage(prompt_tokens=f.usage.prompt_tokens, completion_tokens=f.usage.completion_tokens),
        input_verdict=verdict_to_proto(f.input_verdict),
        output_verdict=verdict_to_proto(f.output_verdict),
        timings=generation_pb2.Timings(queue_seconds=f.timings.queue,
                                       time_to_first_token_seconds=f.timings.time_to_first_token,
                                       total_seconds=f.timings.total),
        request_id=f.request_id,
    )


def moderation_role(request: moderation_pb2.ModerateRequest) -> Role:
    """The judged role; UNSPECIFIED means the role of the last message (assistant -> Agent, else User)."""
    role = MODERATION_ROLES.get(request.role)
    if role is not None:
        return role
    return Role.AGENT if request.messages[-1].role == common_pb2.CHAT_ROLE_ASSISTANT else Role.USER
