"""The `guard` section of the server's configuration (`service.config`): which moderation backend runs and the
deployment's policy. Defaults come from `guard.policy`, their one source of truth; `service.config` re-exports
both names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from guard.policy import (
    DEFAULT_FIRST_RELEASE_WINDOW_TOKENS,
    DEFAULT_MAX_MODERATE_CALLS,
    DEFAULT_MAX_MODERATE_CHARS,
    DEFAULT_OUTPUT_CONFIRM_SCORE,
    DEFAULT_OUTPUT_CONTEXT_CHARS,
    DEFAULT_OUTPUT_PREFILTER_BELOW,
    DEFAULT_OUTPUT_PREFILTER_CHARS,
    DEFAULT_RELEASE_WINDOW_TOKENS,
    DEFAULT_THRESHOLD,
    DEFAULT_TIMEOUT_SECONDS,
    TIMEOUT_CHARS,
)
from service.config_field import setting_doc as _doc


class GuardBackend(enum.StrEnum):
    CLASSIFIER = "classifier"  # embedded head over sentence-encoder features (guard/backends/classifier.py)
    LLAMA_GUARD = "llama_guard"  # a Llama Guard model as a second engine instance
    CASCADE = "cascade"  # classifier first, Llama Guard for the uncertain band
    NONE = "none"  # no moderation (GuardOptions and Moderate then fail with FAILED_PRECONDITION)


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Defaults for thresholds, window and timeout come from `guard.policy`, their one source of truth."""

    # The embedded classifier needs no second model, so moderation is on out of the box.
    backend: GuardBackend = field(default=GuardBackend.CLASSIFIER, metadata=_doc("Moderation backend."))
    model: Path | None = field(
        default=None, metadata=_doc("Guard model folder (required for llama_guard and cascade).")
    )
    # Where `make encoder` writes the sentence encoder and where the repo ships the trained head.
    encoder: Path = field(
        default=Path("models/minilm-l6-v2-guard"), metadata=_doc("Sentence-encoder folder for the classifier.")
    )
    head: Path = field(
        default=Path("guard/heads/minilm-l6-v2.npz"), metadata=_doc("Trained classifier head file.")
    )
    # Empty (the default): Agent turns are judged by `encoder` and `head` too; `make run GUARD_PROFILE=split`
    # sets both to the opt-in Agent-turn head (guard/heads/output/, README "Moderation").
    output_encoder: Path | None = field(
        default=None,
        metadata=_doc("Sentence-encoder folder for a second classifier head that judges Agent turns (output "
                      "checks, Moderate as Agent); empty: the encoder above judges both roles."),
    )
    output_head: Path | None = field(
        default=None,
        metadata=_doc("That second head (set both or neither); empty: the head above judges both roles."),
    )
    # 1 leaves the cores to the generator; 2 halves an input verdict on an idle 2-core machine (docs/GUARD.md).
    encoder_threads: int = field(
        default=1,
        metadata=_doc("onnxruntime threads for the classifier's encoder (one worker runs it; checks queue for it, "
                      "input verdicts first).", low=1),
    )
    input_threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata=_doc("Block a user turn when its unsafe score is >= this.", low=0, high=1),
    )
    output_threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata=_doc("Block model output when its unsafe score is >= this.", low=0, high=1),
    )
    # The classifier is reliable far from its threshold; only the band around it is worth a Llama Guard call.
    cascade_low: float = field(
        default=0.2,
        metadata=_doc("cascade: classifier scores in [low, high) go to Llama Guard.", low=0, high=1),
    )
    cascade_high: float = field(
        default=0.8, metadata=_doc("cascade: upper end of that band.", low=0, high=1)
    )
    # A moderation stage that silently lets content through when it breaks is not a moderation stage.
    fail_open: bool = field(
        default=False, metadata=_doc("Let content through (instead of blocking) when the guard fails.")
    )
    release_window_tokens: int = field(
        default=DEFAULT_RELEASE_WINDOW_TOKENS,
        metadata=_doc("Streamed output is released after at most this many judged tokens.", low=1),
    )
    first_release_window_tokens: int = field(
        default=DEFAULT_FIRST_RELEASE_WINDOW_TOKENS,
        metadata=_doc("The first release comes after this many judged tokens; later windows double up to "
                      "release_window_tokens.", low=1),
    )
    output_context_chars: int = field(
        default=DEFAULT_OUTPUT_CONTEXT_CHARS,
        metadata=_doc("Output checks judge the answer's last this-many characters, and more when a window's new "
                      "text is longer (cost per check grows with it).", low=1),
    )
    output_prefilter_chars: int = field(
        default=DEFAULT_OUTPUT_PREFILTER_CHARS,
        metadata=_doc("Output checks first judge the answer's last this-many characters and read "
                      "output_context_chars only when that is not clearly safe; 0 turns the prefilter off.", low=0),
    )
    output_prefilter_below: float = field(
        default=DEFAULT_OUTPUT_PREFILTER_BELOW,
        metadata=_doc("A prefilter verdict settles an output check when safe with a score below this (a request "
                      "that lowers output_threshold lowers it in proportion).", low=0,
                      high=1),
    )
    output_confirm_score: float = field(
        default=DEFAULT_OUTPUT_CONFIRM_SCORE,
        metadata=_doc("A flagged output check holds its window; the stream stops only if the next check is unsafe "
                      "or scores at least this (scaled like output_prefilter_below); 0: every flag stops at once. "
                      "0.1 was measured (docs/GUARD.md); a request may opt out (stop_on_first_flag).", low=0,
                      high=1),
    )
    excluded_categories: tuple[str, ...] = field(
        default=(), metadata=_doc("Category codes not blocked, e.g. S6,S8.")
    )
    timeout_seconds: float = field(
        default=DEFAULT_TIMEOUT_SECONDS,
        metadata=_doc(f"A guard check of up to {TIMEOUT_CHARS} characters taking longer counts as failed; "
                      "longer conversations get proportionally more.", low=0, low_open=True),
    )
    max_moderate_chars: int = field(
        default=DEFAULT_MAX_MODERATE_CHARS,
        metadata=_doc("Most characters (all messages) one Moderate call may send; more get INVALID_ARGUMENT.",
                      low=1),
    )
    max_moderate_calls: int = field(
        default=DEFAULT_MAX_MODERATE_CALLS,
        metadata=_doc("Moderate calls in progress at once; more get RESOURCE_EXHAUSTED.", low=1),
    )
