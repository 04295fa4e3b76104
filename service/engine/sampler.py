"""Choosing the next token from one row of logits: penalties, temperature, top-k / top-p / min-p, logprobs.

A `Sampler` is built once per request by `make_sampler` and then called once per step, so the hot path
is numpy vector work on the vocabulary row plus a handful of Python operations; nothing loops over the
vocabulary in Python and full sorts are avoided (`np.argpartition` picks candidates first).

Order of operations (the same as vLLM and HF `generate`):
  1. repetition penalty (HF/CTRL-style) over every token seen in the prompt or the output:
     a positive logit is divided by the penalty, a negative one multiplied;
  2. presence / frequency penalties (OpenAI-style) over the generated tokens only:
     `logit -= presence * (count > 0) + frequency * count`;
  3. temperature 0 -> argmax (ties go to the lowest id); otherwise divide by the temperature, then
     top-k, top-p (nucleus), min-p, and draw from the softmax of what is left.

Which logprobs are reported: those of the distribution the token was actually drawn from, i.e. after
penalties, temperature and the filters, renormalised over the surviving candidates (for greedy: the
log-softmax of the penalised logits at temperature 1). vLLM reports the raw model logprobs by default;
we chose the processed ones because then `exp(logprob)` is exactly the probability with which this
token was chosen in this response, alternatives listed in `top` are real alternatives that could have
been drawn (a filtered-out token would have logprob -inf, which JSON and most clients cannot carry),
and the numbers stay consistent with the seed-reproducible draw. A consequence: `top` may list fewer
than `top_logprobs` entries when the filters keep fewer candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.engine.types import SamplingParams

# OpenAI's API caps top_logprobs at 20; the cap also bounds the per-token argpartition and the size of
# every streamed TokenEvent.
MAX_TOP_LOGPROBS = 20

# Top-k / top-p / top-logprobs rank only the tokens whose logit is within a gap of the maximum, trying
# wider gaps until enough tokens (or enough mass) are in. Such a set is a prefix of the full ranking, ties
# included, so the result equals a full sort's. exp(-8) is 3e-4 of the top probability: LLM rows are
# peaked, so the first gap usually holds a few hundred tokens and the full sort is the rare fallback.
_CANDIDATE_GAPS = (8.0, 16.0, 32.0, math.inf)
# numpy's cumsum is sequential and slow (several ns per element); the draw sums blocks with a vectorised
# reduction and runs cumsum only over the block sums and inside the chosen block.
_DRAW_BLOCK = 256

FloatArray = npt.NDArray[np.float64]
IdArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SampledToken:
    """The chosen token, and its logprob and top alternatives when requested.

    Args:
        token_id: the chosen token.
        logprob: its log-probability under the sampled distribution, or None when not requested.
        top: up to `top_logprobs` (id, logprob) pairs, most likely first (ties: lowest id first).
    """

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def greedy_batch(logits: np.ndarray) -> IdArray:
    """Argmax per row, for a batch whose rows all use greedy decoding without penalties or logprobs.

    Args:
        logits: (batch, vocab) array; not modified.

    Returns:
        (batch,) int64 array of token ids; ties go to the lowest id, as in `Sampler.sample`.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {logits.shape}")
    return np.asarray(np.argmax(logits, axis=-1), dtype=np.int64)


def make_sampler(params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int) -> Sampler:
    """Build the per-request sampler.

    Range policy (e.g. top_k <= vocab) belongs to the servicer; this only rejects values that would crash
    or produce NaN.

    Args:
        params: the request's sampling parameters.
        prompt_ids: the prompt, seen by the repetition penalty.
        vocab_size: length of one logits row.

    Returns:
        A `Sampler` with its own random generator (seeded from `params.seed`, fresh entropy when None).

    Raises:
        ValueError: with a message such as "top_p must be in (0, 1], got 1.5".
    """
    prompt = validate_sampling(params, prompt_ids, vocab_size)
    rng = np.random.Generator(np.random.PCG64(params.seed))
    return Sampler(params, prompt, vocab_size, rng)


def validate_sampling(params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int) -> IdArray:
    """The checks `make_sampler` applies, without building a sampler (the engine runs them at submit).

    Args:
        params: the request's sampling parameters.
        prompt_ids: the prompt.
        vocab_size: length of one logits row.

    Returns:
        The prompt as an int64 array.

    Raises:
        ValueError: as `make_sampler`.
    """
    _check_params(params, vocab_size)
    prompt = np.asarray(prompt_ids, dtype=np.int64)  # (prompt_len,)
    if prompt.size and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size):
        raise ValueError(f"prompt_ids must be in [0, {vocab_size}), got a token id out of range")
    return prompt


def _check_params(p: SamplingParams, vocab_size: int) -> None:
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    # `not (x >= 0)` also rejects NaN.
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {p.temperature}")
    if p.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {p.top_k}")
    if not (0.0 < p.top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if not (0.0 <= p.min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}")
    if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty}")
    if not math.isfinite(p.presence_penalty):
        raise ValueError(f"presence_penalty must be finite, got {p.presence_penalty}")
    if not math.isfinite(p.frequency_penalty):
        raise ValueError(f"frequency_penalty must be finite, got {p.frequency_penalty}")
    if not (0 <= p.top_logprobs <= MAX_TOP_LOGPROBS):
        raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs}")
    if p.seed is not None and p.seed < 0:
        raise ValueError(f"seed must be >= 0, got {p.seed}")


class Sampler:
    """Per-request sampling state: parameters, penalty bookkeeping, scratch buffers and the generator.

    Not thread-safe; the engine thread owns it. Call `sample(row)` then `accept(token_id)` each step.
    """

    __slots__ = (
        "_counts",
        "_generated_arr",
        "_generated_ids",
        "_p",
        "_penalise",
        "_rng",
        "_seen",
        "_seen_arr",
        "_seen_ids",
        "_top_n",
        "_vocab_size",
        "_w",
        "_want_logprob",
        "_x",
        "fast_greedy",
    )

    def __init__(self, params: SamplingParams, prompt: IdArray, vocab_size: int, rng: np.random.Generator):
        self._p = params
        self._rng = rng
        self._vocab_size = vocab_size
        self._top_n = params.top_logprobs
        # top_logprobs without logprobs still implies the chosen token's logprob: the alternatives
        # are meaningless without it.
        self._want_logprob = params.logprobs or params.top_logprobs > 0
        uses_rep = params.repetition_penalty != 1.0
        uses_freq = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._penalise = uses_rep or uses_freq
        # Repetition penalty state: a membership mask (O(1) accept) plus the id list it is applied to.
        self._seen: npt.NDArray[np.bool_] | None = None
        self._seen_ids: list[int] = []
        self._seen_arr: IdArray | None = None  # cache of _seen_ids as an array; None when stale
        if uses_rep:
            self._seen = np.zeros(vocab_size, dtype=np.bool_)
            self._seen[prompt] = True
            self._seen_ids = np.flatnonzero(self._seen).tolist()
        # Presence/frequency state: per-token counts of generated tokens, and which ids have a count.
        self._counts: npt.NDArray[np.int32] | None = (
            np.zeros(vocab_size, dtype=np.int32) if uses_freq else None
        )
        self._generated_ids: list[int] = []
        self._generated_arr: IdArray | None = None
        #: True when the scheduler may use `greedy_batch` for this request instead of `sample`.
        self.fast_greedy = params.temperature == 0.0 and not self._penalise and not self._want_logprob
        # Scratch rows reused every step: fresh vocab-sized temporaries would each cost an mmap and page
        # faults. _x holds the processed logits, _w unnormalised probabilities.
        scratch = 0 if self.fast_greedy else vocab_size
        self._x: FloatArray = np.empty(scratch, dtype=np.float64)
        self._w: FloatArray = np.empty(scratch, dtype=np.float64)

    def accept(self, token_id: int) -> None:
        """Record a generated token for the penalties.

        Args:
            token_id: the token that was appended to the sequence.
        """
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token_id must be in [0, {self._vocab_size}), got {token_id}")
        if self._seen is not None and not self._seen[token_id]:
            self._seen[token_id] = True
            self._seen_ids.append(token_id)
            self._seen_arr = None
        if self._counts is not None:
            if self._counts[token_id] == 0:
                self._generated_ids.append(token_id)
                self._generated_arr = None
            self._counts[token_id] += 1

    def sample(self, logits: np.ndarray) -> SampledToken:
        """Choose the next token.

        Args:
            logits: float32 (vocab,) row; may be a view into the batch buffer and is never modified.

        Returns:
            The chosen token with its logprob and alternatives when requested.
        """
        if logits.shape != (self._vocab_size,):
            raise ValueError(f"logits must have shape ({self._vocab_size},), got {logits.shape}")
        if self.fast_greedy:
            return SampledToken(int(np.argmax(logits)), None, ())
        x = self._x
        np.copyto(x, logits)  # float64 private copy: penalties and temperature work in place on it
        self._apply_penalties(x)
        if self._p.temperature == 0.0:
            return self._greedy(x)
        x /= self._p.temperature
        ids, vals = self._filter(x)
        return self._draw(ids, vals)

    def _greedy(self, x: FloatArray) -> SampledToken:
        token = int(np.argmax(x))
        if not self._want_logprob:
            return SampledToken(token, None, ())
        m = float(x[token])
        w = self._w
        np.subtract(x, m, out=w)
        np.exp(w, out=w)
        lse = m + math.log(float(w.sum()))
        return SampledToken(token, float(x[token] - lse), _top_pairs(None, x, self._top_n, lse))

    def _apply_penalties(self, x: FloatArray) -> None:
        """Penalise `x` (the private float64 copy) in place."""
        if self._seen is not None and self._seen_ids:
            if self._seen_arr is None:
                self._seen_arr = np.asarray(self._seen_ids, dtype=np.int64)
            ids = self._seen_arr
            v = x[ids]
            rp = self._p.repetition_penalty
            x[ids] = np.where(v > 0, v / rp, v * rp)
        if self._counts is not None and self._generated_ids:
            if self._generated_arr is None:
                self._generated_arr = np.asarray(self._generated_ids, dtype=np.int64)
            ids = self._generated_arr
            # every listed id has count > 0, so the presence term applies to all of them
            x[ids] -= self._p.presence_penalty + self._p.frequency_penalty * self._counts[ids]

    def _filter(self, x: FloatArray) -> tuple[IdArray | None, FloatArray]:
        """Apply top-k, top-p and min-p. Returns (ids, or None for the whole vocabulary; their values)."""
        ids: IdArray | None = None
        vals = x
        k = self._p.top_k
        if 0 < k < vals.size:
            ids = _top_k_ids(vals, k)
            vals = vals[ids]
        if self._p.top_p < 1.0:
            keep = _top_p_positions(vals, self._p.top_p, self._w)
            ids = keep if ids is None else ids[keep]
            vals = vals[keep]
        if self._p.min_p > 0.0:
            # p_i >= min_p * p_max  <=>  v_i >= v_max + log(min_p): no softmax needed.
            keep = np.flatnonzero(vals >= vals.max() + math.log(self._p.min_p))
            if keep.size < vals.size:
                ids = keep if ids is None else ids[keep]
                vals = vals[keep]
        return ids, vals

    def _draw(self, ids: IdArray | None, vals: FloatArray) -> SampledToken:
        m = float(vals.max())
        w = self._w[: vals.size]
        np.subtract(vals, m, out=w)
        np.exp(w, out=w)  # unnormalised probabilities, (candidates,)
        pos, total = _inverse_cdf(w, self._rng.random())
        token = pos if ids is None else int(ids[pos])
        if not self._want_logprob:
            return SampledToken(token, None, ())
        lse = m + math.log(total)
        return SampledToken(token, float(vals[pos] - lse), _top_pairs(ids, vals, self._top_n, lse))


def _near_top(x: FloatArray, enough: int) -> IdArray:
    """Ids (ascending) of every value within the narrowest gap of the max that admits `enough` of them."""
    floor = float(x.max())
    cand = np.flatnonzero(x >= floor - _CANDIDATE_GAPS[0])
    for gap in _CANDIDATE_GAPS[1:]:
        if cand.size >= enough:
            break
        cand = np.flatnonzero(x >= floor - gap)
    return cand


def _top_k_ids(x: FloatArray, k: int) -> IdArray:
    """Exactly k ids (ascending) with the largest values; ties at the k-th value go to the lowest ids."""
    cand = _near_top(x, k)
    if cand.size <= k:
        return cand
    sub = x[cand]
    kth = np.partition(sub, sub.size - k)[sub.size - k]
    above = np.flatnonzero(sub > kth)
    tied = np.flatnonzero(sub == kth)[: k - above.size]
    return cand[np.sort(np.concatenate((above, tied)))]


def _ranked(ids: IdArray, vals: FloatArray) -> IdArray:
    """Positions of `vals` ordered by value descending, then by id ascending (deterministic ties)."""
    return np.lexsort((ids, -vals))


def _top_p_positions(vals: FloatArray, top_p: float, scratch: FloatArray) -> IdArray:
    """Positions (ascending) of the smallest most-likely set with mass >= `top_p`; at least one."""
    m = float(vals.max())
    w = scratch[: vals.size]
    np.subtract(vals, m, out=w)
    np.exp(w, out=w)  # unnormalised probabilities, (n,)
    target = top_p * float(w.sum())
    for gap in _CANDIDATE_GAPS:
        cand = np.flatnonzero(vals >= m - gap)
        if float(w[cand].sum()) >= target:
            break
    order = cand[_ranked(cand, w[cand])]
    cum = np.cumsum(w[order])
    count = min(int(np.searchsorted(cum, target, side="left")) + 1, order.size)
    return np.sort(order[:count])


def _inverse_cdf(w: FloatArray, u: float) -> tuple[int, float]:
    """Draw a position with probability proportional to `w` from a uniform `u` in [0, 1).

    Returns:
        (position, total weight). Zero-weight positions are never returned.
    """
    if w.size <= _DRAW_BLOCK:  # small candidate sets (top-k, top-p) skip the block level
        cum = np.cumsum(w)
        total = float(cum[-1])
        return _search(cum, w, u * total), total
    full = w.size - w.size % _DRAW_BLOCK
    sums = np.add.reduce(w[:full].reshape(-1, _DRAW_BLOCK), axis=1)  # (blocks,)
    if full < w.size:
        sums = np.append(sums, w[full:].sum())
    cum = np.cumsum(sums)
    total = float(cum[-1])
    target = u * total
    b = _search(cum, sums, target)
    block = w[b * _DRAW_BLOCK : (b + 1) * _DRAW_BLOCK]
    rest = max(target - (float(cum[b - 1]) if b else 0.0), 0.0)
    return b * _DRAW_BLOCK + _search(np.cumsum(block), block, rest), total


def _search(cum: FloatArray, weights: FloatArray, target: float) -> int:
    """First index whose cumulative weight exceeds `target`; rounding past the end -> last positive."""
    i = int(np.searchsorted(cum, target, side="right"))
    if i >= cum.size:
        i = int(np.flatnonzero(weights)[-1])
    return i


def _top_pairs(ids: IdArray | None, vals: FloatArray, n: int, lse: float) -> tuple[tuple[int, float], ...]:
    """The n most likely (id, logprob) pairs, most likely first; ties by lowest id."""
    if n == 0:
        return ()
    pos = np.arange(vals.size, dtype=np.int64) if vals.size <= n else _top_k_ids(vals, n)
    tok = pos if ids is None else ids[pos]
    order = _ranked(tok, vals[pos])
    return tuple((int(tok[i]), float(vals[pos[i]] - lse)) for i in order)
