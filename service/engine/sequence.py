"""Per-request generation state inside the engine thread: prompt progress, sampler, detokenizer, stopping."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import numpy as np

from service.engine.sampler import SampledToken, Sampler, make_sampler
from service.engine.stopping import StopChecker
from service.engine.types import (
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from service.text.detokenizer import StreamingDetokenizer
from service.text.tokenizer import Tokenizer


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(slots=True)
class SeqTimes:
    arrival: float
    admitted: float = 0.0
    first_token: float = 0.0


class Sequence:
    """One running request. Created when it gets a slot; `step` turns logits into a TokenEvent."""

    def __init__(self, req: GenerationRequest, slot: int, tokenizer: Tokenizer, eos_ids: frozenset[int],
                 context_left: int) -> None:
        self.req = req
        self.slot = slot
        self.phase = Phase.PREFILL
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.generated = 0
        self.next_input = -1  # token to feed at the next decode step
        self.sampler: Sampler = make_sampler(req.sampling, req.prompt_ids, tokenizer.vocab_size)
        self.detok = StreamingDetokenizer(tokenizer)
        self.stop = StopChecker(req.stop, eos_ids, req.max_new_tokens, context_left)
        self.times = SeqTimes(arrival=req.arrival or time.perf_counter(), admitted=time.perf_counter())
        self._tokenizer = tokenizer

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    def next_chunk(self, chunk: int) -> tuple[int, ...]:
        """The next prompt chunk to prefill (at most `chunk` tokens)."""
        return self.req.prompt_ids[self.prefilled : self.prefilled + chunk]

    def accept(self, sampled: SampledToken, scored: tuple[TokenLogprob, ...] = ()) -> TokenEvent:
        """Consumes one sampled token: updates penalties, detokenizes, applies stop rules."""
        now = time.perf_counter()
        if self.generated == 0:
            self.times.first_token = now
        self.generated += 1
        tok = sampled.token_id
        self.sampler.accept(tok)
        res = self.stop.push(tok, self.detok.add(tok))
        self.next_input = tok
        lp, top = self._logprobs(sampled)
        if res.finish is None:
            return TokenEvent(token_id=tok, text=res.emit, logprob=lp, top_logprobs=top, scored=scored)
        text = res.emit
        if res.finish is not FinishReason.EOS and res.finish is not FinishReason.STOP_SEQUENCE:
            text += self.stop.flush()
        self.phase = Phase.DONE
        return TokenEvent(token_id=tok, text=text, logprob=lp, top_logprobs=top, finish_reason=res.finish,
                          usage=self.usage(), timings=self.timings(now), scored=scored)

    def abort(self, reason: FinishReason) -> TokenEvent:
        """Ends the sequence without a token (cancel, deadline, error, content filter)."""
        self.phase = Phase.DONE
        text = "" if reason in (FinishReason.ERROR, FinishReason.CONTENT_FILTER) else self.stop.flush()
        return TokenEvent(token_id=None, text=text, finish_reason=reason, usage=self.usage(),
                          timings=self.timings(time.perf_counter()))

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_len, completion_tokens=self.generated)

    def timings(self, now: float) -> Timings:
        a = self.times.arrival
        ttft = self.times.first_token - a if self.times.first_token else 0.0
        return Timings(queue=self.times.admitted - a, time_to_first_token=ttft, total=now - a)

    def _logprobs(self, s: SampledToken) -> tuple[TokenLogprob | None, tuple[TokenLogprob, ...]]:
        if s.logprob is None:
            return None, ()
        dec = self._tokenizer.decode
        top = tuple(TokenLogprob(i, lp, dec([i])) for i, lp in s.top)
        return TokenLogprob(s.token_id, s.logprob, dec([s.token_id])), top


def attention_mask(lengths: np.ndarray) -> np.ndarray:
    """(batch,) valid lengths -> (batch, max) int64 right-padded mask of ones."""
    width = int(lengths.max())
    return (np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]).astype(np.int64)
