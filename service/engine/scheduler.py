"""One engine step: admit, cancel, expire, prefill one chunk, decode every running sequence in one batch.

Runs only on the engine thread. Decode batches cover slot rows [0, active_range); rows that are free or
still prefilling ride along as dummies (their one-token write lands at a position that is overwritten
before it is ever read), so slots never need compaction and a batch is one contiguous KV view.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from service.engine.kv_cache import KVCache
from service.engine.prefix_cache import PrefixCache
from service.engine.sampler import SampledToken, greedy_batch
from service.engine.sequence import Phase, Sequence, attention_mask
from service.engine.session import DecoderSession
from service.engine.types import FinishReason, TokenEvent, TokenLogprob
from service.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from service.engine.engine import RequestHandle

log = logging.getLogger(__name__)


class Scheduler:
    """Continuous batching over a fixed set of KV slots."""

    def __init__(self, session: DecoderSession, kv: KVCache, tokenizer: Tokenizer, eos_ids: frozenset[int],
                 prefill_chunk: int, max_context: int, prefix_cache_slots: int = 0) -> None:
        self.session = session
        self.kv = kv
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context
        self.running: dict[RequestHandle, Sequence] = {}
        self.prefixes = PrefixCache(kv, prefix_cache_slots)
        slots = kv.layout.slots
        # Preallocated per-step buffers: logits (slots, 1, vocab) and decode input ids (slots, 1).
        self._logits = np.zeros((slots, 1, session.vocab_size), np.float32)
        self._ids = np.zeros((slots, 1), np.int64)
        self._lengths = np.ones(slots, np.int64)
        self.steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # -- the step ---------------------------------------------------------------------------------------
    def step(self, admitted: Seq[RequestHandle], cancels: Seq[RequestHandle], now: float) -> None:
        out: dict[RequestHandle, list[TokenEvent]] = {}
        for h in cancels:
            self._end(h, FinishReason.CANCELLED, out)
        for h, seq in list(self.running.items()):
            if seq.req.deadline is not None and now >= seq.req.deadline:
                self._end(h, FinishReason.DEADLINE, out)
        for h in admitted:
            self._admit(h, now, out)
        self._prefill_one(out)
        self._decode(out)
        self.steps += 1
        for h, events in out.items():
            h._deliver(events)

    def _admit(self, h: RequestHandle, now: float, out: dict[RequestHandle, list[TokenEvent]]) -> None:
        req = h.request
        if req.deadline is not None and now >= req.deadline:
            out.setdefault(h, []).append(TokenEvent(None, "", finish_reason=FinishReason.DEADLINE))
            return
        slot = self.kv.allocate()
        try:
            seq = Sequence(req, slot, self.tokenizer, self.eos_ids, self.max_context - len(req.prompt_ids))
        except Exception:
            log.exception("request %s could not start", req.request_id)
            self.kv.release(slot)
            out.setdefault(h, []).append(TokenEvent(None, "", finish_reason=FinishReason.ERROR))
            return
        n = req.cache_prefix_len
        if 0 < n < len(req.prompt_ids):
            restored = self.prefixes.restore(req.prompt_ids[:n], slot)
            seq.prefilled = restored
        self.running[h] = seq

    def _end(self, h: RequestHandle, reason: FinishReason, out: dict[RequestHandle, list[TokenEvent]]) -> None:
        seq = self.running.pop(h, None)
        if seq is None:
            return
        self.kv.release(seq.slot)
        out.setdefault(h, []).append(seq.abort(reason))

    def _finish_if_done(self, h: RequestHandle, seq: Sequence) -> None:
        if seq.phase is Phase.DONE:
            self.running.pop(h, None)
            self.kv.release(seq.slot)

    # -- prefill ----------------------------------------------------------------------------------------
    def _prefill_one(self, out: dict[RequestHandle, list[TokenEvent]]) -> None:
        """Prefills one chunk of the oldest prefilling sequence (bounded work per step)."""
        target = next(((h, s) for h, s in self.running.items() if s.phase is Phase.PREFILL), None)
        if target is None:
            return
        h, seq = target
        chunk = seq.next_chunk(self.prefill_chunk)
        offset = self.kv.offset(seq.slot)
        ids = np.asarray([chunk], dtype=np.int64)  # (1, chunk)
        mask = np.ones((1, offset + len(chunk)), dtype=np.int64)  # (1, total)
        logits = self._logits[seq.slot : seq.slot + 1]
        try:
            self.session.forward(self.kv, seq.slot, ids, mask, logits)
        except Exception:
            log.exception("prefill failed for request %s", seq.req.request_id)
            self._end(h, FinishReason.ERROR, out)
            return
        self.kv.append(seq.slot, len(chunk))
        seq.prefilled += len(chunk)
        self.prompt_tokens += len(chunk)
        n = seq.req.cache_prefix_len
        if 0 < n <= seq.prefilled and not self.prefixes.has(seq.req.prompt_ids[:n]):
            self.prefixes.store(seq.req.prompt_ids[:n], seq.slot)
        if seq.prefilled == seq.prompt_len:
            seq.phase = Phase.DECODE
            try:
                scored = _score(logits[0, 0], seq.req.score_token_ids)
                sampled = seq.sampler.sample(logits[0, 0])
            except Exception:  # this request's failure only: escaping the step would fail every request
                log.exception("sampling failed for request %s", seq.req.request_id)
                self._end(h, FinishReason.ERROR, out)
                return
            self._accept(h, seq, sampled, out, scored)

    # -- decode -----------------------------------------------------------------------------------------
    def _decode(self, out: dict[RequestHandle, list[TokenEvent]]) -> None:
        decoding = [(h, s) for h, s in self.running.items() if s.phase is Phase.DECODE]
        if not decoding:
            return
        rows = self.kv.active_range()
        ids, lengths = self._ids[:rows], self._lengths[:rows]
        ids.fill(0)
        # Dummy rows (free or prefilling) write one position at their current offset, later overwritten.
        np.add(self.kv.lengths[:rows], 1, out=lengths)
        for _, s in decoding:
            ids[s.slot, 0] = s.next_input
        logits = self._logits[:rows]
        try:
            self.session.forward(self.kv, 0, ids, attention_mask(lengths), logits)
        except Exception:
            log.exception("decode step failed; ending %d requests", len(decoding))
            for h, _ in decoding:
                self._end(h, FinishReason.ERROR, out)
            return
        greedy = [(h, s) for h, s in decoding if s.sampler.fast_greedy]
        if greedy:
            # Argmax over the (rows, vocab) view: no copy of the greedy rows' logits.
            picked = greedy_batch(logits[:, 0]).tolist()
            for h, s in greedy:
                self.kv.append(s.slot, 1)
                self._accept(h, s, SampledToken(picked[s.slot], None, ()), out)
        for h, s in decoding:
            if s.sampler.fast_greedy:
                continue
            self.kv.append(s.slot, 1)
            try:
                sampled = s.sampler.sample(logits[s.slot, 0])
            except Exception:
                log.exception("sampling failed for request %s", s.req.request_id)
                self._end(h, FinishReason.ERROR, out)
                continue
            self._accept(h, s, sampled, out)

    def _accept(self, h: RequestHandle, seq: Sequence, sampled: SampledToken,
                out: dict[RequestHandle, list[TokenEvent]], scored: tuple[TokenLogprob, ...] = ()) -> None:
        try:
            ev = seq.accept(sampled, scored)
        except Exception:
            log.exception("token handling failed for request %s", seq.req.request_id)
            self._end(h, FinishReason.ERROR, out)
            return
        self.generation_tokens += 1
        out.setdefault(h, []).append(ev)
        self._finish_if_done(h, seq)

    # -- shutdown / failure -----------------------------------------------------------------------------
    def fail_all(self) -> None:
        self._abort_all(FinishReason.ERROR)

    def cancel_all(self) -> None:
        self._abort_all(FinishReason.CANCELLED)

    def _abort_all(self, reason: FinishReason) -> None:
        out: dict[RequestHandle, list[TokenEvent]] = {}
        for h in list(self.running):
            self._end(h, reason, out)
        for h, events in out.items():
            h._deliver(events)


def _score(logits: np.ndarray, token_ids: tuple[int, ...]) -> tuple[TokenLogprob, ...]:
    """Full-vocabulary log-softmax of the raw logits at `token_ids` (e.g. P("unsafe") for a guard)."""
    if not token_ids:
        return ()
    x = logits.astype(np.float64)
    lse = float(np.log(np.exp(x - x.max()).sum()) + x.max())
    return tuple(TokenLogprob(t, float(x[t]) - lse) for t in token_ids)
