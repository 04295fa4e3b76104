"""Domain types shared by the engine, the pipeline, the guard wiring and the servicer.

These are plain frozen dataclasses: no protobuf, no onnxruntime. The servicer converts proto <-> these;
the engine consumes `GenerationRequest` and yields `TokenEvent`s.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    """Why a sequence stopped. Bounded set: also used as a metric label."""

    EOS = "eos"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CONTENT_FILTER = "content_filter"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen. `temperature == 0` means greedy (argmax); other fields then do nothing
    except the penalties, which apply before the argmax, as in vLLM."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled
    min_p: float = 0.0  # 0.0 = disabled
    repetition_penalty: float = 1.0  # HF/CTRL-style: divides positive logits of seen tokens (prompt + output)
    presence_penalty: float = 0.0  # OpenAI-style: subtract once per token already generated
    frequency_penalty: float = 0.0  # OpenAI-style: subtract per occurrence in the generated tokens
    seed: int | None = None  # same seed + same request = same tokens
    logprobs: bool = False  # return the chosen token's logprob
    top_logprobs: int = 0  # and this many alternatives (0..MAX_TOP_LOGPROBS)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request as the engine sees it: token ids already rendered and tokenized.

    Args:
        request_id: opaque id for logs and cancellation; never a metric label.
        prompt_ids: the full prompt, chat template already applied.
        sampling: sampling parameters.
        max_new_tokens: upper bound on generated tokens (the context limit may stop earlier).
        stop: stop strings; matched on the decoded text, also across token boundaries; never emitted.
        deadline: absolute `time.monotonic()` after which the request ends with `FinishReason.DEADLINE`.
        arrival: `time.perf_counter()` when the request arrived (TTFT is measured from here).
        cache_prefix_len: a hint that the first N prompt tokens recur across requests: the engine keeps
            their KV in a pinned slot (when `prefix_cache_slots` allows) and copies it instead of prefilling.
        score_token_ids: the first event carries these tokens' log-probabilities (full-vocabulary
            log-softmax of the raw logits) in `TokenEvent.scored`.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    deadline: float | None = None
    arrival: float = 0.0
    cache_prefix_len: int = 0  # the first N prompt tokens are a reusable prefix (e.g. a guard policy)
    score_token_ids: tuple[int, ...] = ()  # report these tokens' logprobs at the first generated position


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    text: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds, measured in the engine with perf_counter."""

    queue: float = 0.0  # arrival -> admitted into a slot
    time_to_first_token: float = 0.0  # arrival -> first token sampled
    total: float = 0.0  # arrival -> finish


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step of one sequence. `finish_reason` is None until the last event of the sequence.

    `text` is the newly released text (may be empty while a multi-byte character or a possible stop
    string is held back). The last event may carry no token (e.g. cancelled, or a stop string matched).
    """

    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # set on the last event
    timings: Timings | None = None  # set on the last event
    scored: tuple[TokenLogprob, ...] = ()  # first event only: the request's score_token_ids
