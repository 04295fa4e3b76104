"""gRPC servicers: proto -> domain, one pipeline call, domain -> proto. Errors map in errors.ErrorInterceptor."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from guard.moderator import Stage
from service import convert
from service._pb.sluice.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    moderation_pb2,
    moderation_pb2_grpc,
)
from service.engine.types import FinishReason
from service.errors import DeadlineExceeded, GuardDisabled, QueueFull, Unavailable
from service.pipeline import Chunk, Final, Pipeline
from service.validation import Limits, validate_generate, validate_moderate, validate_tokenize

Context = Any  # grpc.aio.ServicerContext: grpc ships no type stubs


@dataclass(frozen=True, slots=True)
class ServingInfo:
    """Static facts GetModelInfo reports."""

    model_name: str
    precision: str
    context_length: int
    vocab_size: int
    has_chat_template: bool
    guard: generation_pb2.GuardInfo
    server_version: str


# Status message of a Moderate call refused because guard.max_moderate_calls are in progress.
MODERATION_FULL = "moderation is at capacity (guard.max_moderate_calls), retry later"


class InFlight:
    """A count of calls in progress, and an event set while it is zero (a drain waits on it, no polling)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Counts one call as in flight for the duration of the block."""
        self.in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()


class Lifecycle(InFlight):
    """Shared drain flag and the in-flight count of generation calls (server.py drains on SIGTERM)."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False

    def check(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")


def _raise_for(final: Final) -> None:
    """Finish reasons that are failures of the call, not results."""
    if final.finish_reason is FinishReason.DEADLINE:
        raise DeadlineExceeded()
    if final.finish_reason is FinishReason.ERROR:
        raise RuntimeError(f"engine error for request {final.request_id}")  # -> INTERNAL, logged
    if final.finish_reason is FinishReason.CANCELLED:
        raise Unavailable("server is shutting down; retry on another replica")


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, pipeline: Pipeline, limits: Limits, info: ServingInfo, life: Lifecycle) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.info = info
        self.life = life

    def _command(self, request: Any, rpc: str, context: Context) -> Any:
        self.life.check()
        validate_generate(request, self.limits)
        rid = request.request_id or uuid.uuid4().hex
        return convert.command_from_proto(request, rpc, self.limits.default_max_new_tokens,
                                          context.time_remaining(), rid)

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: Context) -> AsyncIterator[generation_pb2.GenerateResponse]:
        cmd = self._command(request, "Generate", context)
        with self.life.track():
            async for item in self.pipeline.generate(cmd):
                if isinstance(item, Chunk):
                    if item.events:
                        yield convert.chunk_to_proto(item)
                    continue
                _raise_for(item)
                yield generation_pb2.GenerateResponse(final=convert.final_to_proto(item))

    async def Complete(self, request: generation_pb2.CompleteRequest,
                       context: Context) -> generation_pb2.CompleteResponse:
        cmd = self._command(request, "Complete", context)
        with self.life.track():
            resp = generation_pb2.CompleteResponse()
            texts: list[str] = []
            async for item in self.pipeline.generate(cmd):
                if isinstance(item, Chunk):
                    texts.append(item.text)
                    resp.token_ids.extend(e.token_id for e in item.events if e.token_id is not None)
                    resp.logprobs.extend(convert.logprobs_to_proto(item.events))
                    continue
                _raise_for(item)
                resp.final.CopyFrom(convert.final_to_proto(item))
            resp.text = "".join(texts)
            return resp

    async def Tokenize(self, request: generation_pb2.TokenizeRequest,
                       context: Context) -> generation_pb2.TokenizeResponse:
        validate_tokenize(request, self.limits)
        is_prompt = request.WhichOneof("input") == "prompt"
        ids = await asyncio.to_thread(
            self.pipeline.renderer.render,
            request.prompt if is_prompt else None,
            () if is_prompt else convert.messages_from_proto(request.messages.messages))
        return generation_pb2.TokenizeResponse(token_ids=ids, token_count=len(ids))

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest,
                           context: Context) -> generation_pb2.GetModelInfoResponse:
        i, lim = self.info, self.limits
        return generation_pb2.GetModelInfoResponse(model_info=generation_pb2.ModelInfo(
            name=i.model_name, precision=i.precision, context_length=i.context_length, vocab_size=i.vocab_size,
            has_chat_template=i.has_chat_template, guard=i.guard, server_version=i.server_version,
            limits=generation_pb2.Limits(
                default_max_new_tokens=lim.default_max_new_tokens, max_new_tokens_cap=lim.max_new_tokens_cap,
                max_stop_sequences=lim.max_stop_sequences, max_stop_chars=lim.max_stop_chars,
                max_messages=lim.max_messages, max_top_logprobs=lim.max_top_logprobs,
                max_moderate_chars=lim.max_moderate_chars)))


class ModerationServicer(moderation_pb2_grpc.ModerationServiceServicer):
    def __init__(self, pipeline: Pipeline, limits: Limits, life: Lifecycle) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.life = life
        self.active = 0  # Moderate calls in progress (validated, not yet answered)

    async def Moderate(self, request: moderation_pb2.ModerateRequest,
                       context: Context) -> moderation_pb2.ModerateResponse:
        self.life.check()
        if self.pipeline.moderator is None:
            raise GuardDisabled()  # the same message as GuardOptions on a guard-less server (docs/API.md)
        validate_moderate(request, self.limits)
        policy = self.pipeline.request_policy(convert.policy_options_from_proto(request.guard))
        # Bounded like the engine's queue: beyond the bound the caller learns at once and can go elsewhere,
        # instead of queueing work that would only time out behind the streams' checks.
        if self.active >= self.limits.max_moderate_calls:
            raise QueueFull(MODERATION_FULL)
        self.active += 1
        try:
            verdict = await self.pipeline.judge(convert.messages_from_proto(request.messages),
                                                convert.moderation_role(request), Stage.MODERATE, policy)
        finally:
            self.active -= 1
        return moderation_pb2.ModerateResponse(verdict=convert.verdict_to_proto(verdict))
