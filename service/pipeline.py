"""One request's life: render and tokenize, input guard, generate, output guard, release.

The pipeline is the only place that combines the engine and the guard. It owns the invariant that the
client never receives generated text the guard has not judged: every chunk it yields was released by a
`StreamGuard` after a safe verdict covered it. A block is a result (`FinishReason.CONTENT_FILTER`), not
an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from guard.moderator import Message, Moderator, Role, Stage, Verdict
from guard.policy import Policy, PolicyError, PolicyOptions
from guard.stream import CheckRead, StreamGuard
from service.engine.types import FinishReason, GenerationRequest, SamplingParams, Timings, TokenEvent, Usage
from service.errors import InvalidArgument, PromptTooLong, QueueFull
from service.stats import NullSink, RequestRecord, StatsSink
from service.text.chat import ChatTemplate
from service.text.tokenizer import Tokenizer
from service.validation import guard_policy_error

log = logging.getLogger(__name__)


class EventStream(Protocol):
    """What the engine returns for one request."""

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...


class TextGenerator(Protocol):
    """The engine seam (a fake implements it in unit tests)."""

    @property
    def max_context(self) -> int: ...

    def submit(self, req: GenerationRequest) -> EventStream: ...

    def has_room(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class GenerateCommand:
    """A validated request in domain terms. Exactly one of `prompt` / `messages` is set."""

    request_id: str
    prompt: str | None = None
    messages: tuple[Message, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    guard: PolicyOptions = field(default_factory=PolicyOptions)
    deadline: float | None = None  # time.monotonic()
    arrival: float = 0.0  # time.perf_counter()
    rpc: str = "Generate"


@dataclass(frozen=True, slots=True)
class Chunk:
    """Released text and the events (tokens, logprobs) it came from."""

    text: str
    events: tuple[TokenEvent, ...]


@dataclass(frozen=True, slots=True)
class Final:
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    input_verdict: Verdict | None = None
    output_verdict: Verdict | None = None


class PromptRenderer:
    """Raw prompts are plain text (special-token strings stay text); chat messages use the model's template."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, add_bos: bool) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.add_bos = add_bos

    def render(self, prompt: str | None, messages: Sequence[Message]) -> list[int]:
        if prompt is not None:
            ids = self.tokenizer.encode_plain(prompt)
            bos = self.tokenizer.bos_id
            return [bos, *ids] if self.add_bos and bos is not None else ids
        if self.template is None:
            raise InvalidArgument("messages", "this model has no chat template; send a raw prompt")
        try:
            segments = self.template.render_segments(messages, add_generation_prompt=True)
        except ValueError as e:  # unknown role, or the template's own raise_exception
            raise InvalidArgument("messages", str(e)) from e
        return self.tokenizer.encode_segments(segments)


class Pipeline:
    """input guard -> engine -> output guard, for one request at a time (many run concurrently)."""

    def __init__(self, engine: TextGenerator, renderer: PromptRenderer, moderator: Moderator | None,
                 policy: Policy, stats: StatsSink | None = None) -> None:
        self.engine = engine
        self.renderer = renderer
        self.moderator = moderator
        self.policy = policy
        self.stats: StatsSink = stats or NullSink()

    def request_policy(self, options: PolicyOptions) -> Policy:
        try:
            return self.policy.tighten(options)
        except PolicyError as e:
            raise guard_policy_error(e) from e

    async def judge(self, conversation: Sequence[Message], role: Role, stage: Stage, policy: Policy,
                    record: bool = True) -> Verdict:
        """The backend's verdict, re-decided under a per-request (stricter) policy when there is one.

        `record=False` leaves recording to the caller (output checks record one deciding verdict per check,
        however many reads it took: `record_check`)."""
        assert self.moderator is not None
        v = await self.moderator.moderate(conversation, role, stage)
        if policy is not self.policy and not v.error:
            v = policy.decide(role, v.score, v.categories, backend=v.backend, stage=stage, latency=v.latency)
        elif v.error and v.safe and not policy.fail_open:
            # The backend failed and the server fails open, but this request asked to fail closed.
            v = replace(v, safe=False, score=1.0)
        if record:
            self.stats.record_verdict(v)
        return v

    def record_check(self, verdict: Verdict, read: CheckRead) -> None:
        """An output check's deciding verdict, and how the prefilter read it (StreamGuard's `on_decision`)."""
        self.stats.record_verdict(verdict)
        if read == "prefilter" or read == "escalated":
            self.stats.record_prefilter(read)

    async def generate(self, cmd: GenerateCommand) -> AsyncIterator[Chunk | Final]:
        """Runs one request.

        Yields:
            Chunks of released text, then exactly one Final.
        """
        arrival = cmd.arrival or time.perf_counter()
        policy = self.request_policy(cmd.guard)
        conversation = cmd.messages or (Message("user", cmd.prompt or ""),)
        # Over capacity, refuse before tokenizing or guarding: the client must learn it at once (it can go to
        # another replica), and CPU spent on work that cannot be queued is taken from the running streams.
        if not self.engine.has_room():
            raise QueueFull()
        # In a worker thread: tokenizing a multi-megabyte prompt must not stall every other stream.
        ids = await asyncio.to_thread(self.renderer.render, cmd.prompt, cmd.messages)
        if len(ids) >= self.engine.max_context:
            raise PromptTooLong(len(ids), self.engine.max_context, "prompt" if cmd.prompt is not None else "messages")
        rec = _Recorder(cmd.rpc, arrival, len(ids))
        in_verdict = None
        if self.moderator is not None:
            in_verdict = await self.judge(conversation, Role.USER, Stage.INPUT, policy)
            if not in_verdict.safe:
                yield rec.final(self, cmd, FinishReason.CONTENT_FILTER, 0, in_verdict, None)
                return
        stream = self.engine.submit(GenerationRequest(
            request_id=cmd.request_id, prompt_ids=tuple(ids), sampling=cmd.sampling,
            max_new_tokens=cmd.max_new_tokens, stop=cmd.stop, deadline=cmd.deadline, arrival=arrival))
        try:
            guard = None
            if self.moderator is not None:
                async def judge_output(tail: str) -> Verdict:
                    # The guard passes the recent tail, not the whole answer (`judged_tail`): earlier text was
                    # judged by earlier windows, and a bounded text keeps each check's cost flat as it grows.
                    return await self.judge((*conversation, Message("assistant", tail)), Role.AGENT,
                                            Stage.OUTPUT, policy, record=False)
                guard = StreamGuard(judge_output, policy.release_window_tokens, text_of=_event_text,
                                    first_window=policy.first_window_tokens,
                                    context_chars=policy.output_context_chars,
                                    prefilter_chars=policy.output_prefilter_chars or None,
                                    prefilter_below=policy.output_prefilter_below,
                                    on_decision=self.record_check,
                                    confirm_score=policy.output_confirm_score or None)
            async for ev in stream:
                released = [ev] if guard is None else await guard.feed(ev)
                if guard is not None and guard.blocked:
                    stream.cancel()
                    yield rec.final(self, cmd, FinishReason.CONTENT_FILTER, rec.completion, in_verdict, guard.verdict)
                    return
                if ev.finish_reason is None:
                    if released:
                        yield rec.chunk(released)
                    continue
                out_verdict = None
                if guard is not None:
                    # Keep what `feed` just released: the last event may itself have completed a window.
                    tail, out_verdict = await guard.finish()
                    released = [*released, *tail]
                    if not out_verdict.safe:
                        yield rec.final(self, cmd, FinishReason.CONTENT_FILTER, _completion(ev), in_verdict,
                                        out_verdict)
                        return
                if released:
                    yield rec.chunk(released)
                rec.queue = ev.timings.queue if ev.timings else None
                yield rec.final(self, cmd, ev.finish_reason, _completion(ev), in_verdict, out_verdict)
                return
        finally:
            stream.cancel()  # no-op when finished; frees the slot when the client went away
            if guard is not None and (guard.stats.flags_confirmed or guard.stats.flags_cleared):
                self.stats.record_held_flags(guard.stats.flags_confirmed, guard.stats.flags_cleared)


def _event_text(ev: TokenEvent) -> str:
    return ev.text


def _completion(ev: TokenEvent) -> int:
    return ev.usage.completion_tokens if ev.usage else 0


class _Recorder:
    """Client-visible timings of one request (TTFT = first release, so it includes the guards)."""

    def __init__(self, rpc: str, arrival: float, prompt_tokens: int) -> None:
        self.rpc = rpc
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.completion = 0
        self.queue: float | None = None

    def chunk(self, events: Sequence[TokenEvent]) -> Chunk:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now
        self.completion += sum(1 for e in events if e.token_id is not None)
        return Chunk("".join(e.text for e in events), tuple(events))

    def final(self, p: Pipeline, cmd: GenerateCommand, reason: FinishReason, completion: int,
              vin: Verdict | None, vout: Verdict | None) -> Final:
        now = time.perf_counter()
        ttft = None if self.first is None else self.first - self.arrival
        timings = Timings(queue=self.queue or 0.0, time_to_first_token=ttft or 0.0, total=now - self.arrival)
        p.stats.record_request(RequestRecord(
            rpc=cmd.rpc, finish_reason=reason.value, prompt_tokens=self.prompt_tokens,
            completion_tokens=completion, queue_seconds=self.queue, ttft_seconds=ttft,
            e2e_seconds=now - self.arrival, inter_token_seconds=tuple(self.gaps)))
        return Final(cmd.request_id, reason, Usage(self.prompt_tokens, completion), timings, vin, vout)
