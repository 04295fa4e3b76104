"""What a deployment blocks, and how: categories, thresholds, release window, fail-open or fail-closed.

A `Policy` is data. Per-request options go through `Policy.tighten`, which can only make it stricter and
raises `PolicyError` (a ValueError: the servicer maps it to INVALID_ARGUMENT) on any attempt to loosen, so
a client learns at once that its request was not honoured instead of silently getting less than it
asked for. `guard.failsafe.FailSafeModerator` applies the policy's timeout and its fail-open / fail-closed
rule around any backend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from guard.moderator import Role, Stage, Verdict
from guard.stream import first_window_size
from guard.taxonomy import BUILTIN_CODES, CATEGORIES, Category, code_sort_key, is_builtin, sort_codes

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # the Llama Guard 3 model cards' operating point
# 16 tokens bounds what a client can see before a block to roughly one short sentence, while keeping
# judge calls to about one per 16 decode steps (a judge call costs far more than a decode step).
DEFAULT_RELEASE_WINDOW_TOKENS = 16
# The first release window: the client's first text waits for this many judged tokens, not a whole window;
# later windows double up to `release_window_tokens` (guard/stream.py).
DEFAULT_FIRST_RELEASE_WINDOW_TOKENS = 4
# Output checks judge the answer's last this-many characters (~128 tokens): eight release windows of overlap,
# so content spanning a window boundary is still seen whole, and each check's cost stays flat as the answer
# grows. 1024 characters cost ~2x the encoder time for +1 point of unsafe-answer recall (docs/GUARD.md).
DEFAULT_OUTPUT_CONTEXT_CHARS = 512
# Each output check first judges the answer's last 192 characters (~48 tokens) and reads the full context only
# when that verdict's score is >= 0.002 (guard/stream.py). Replayed on 526 dev-split model responses and 200
# benign answers (docs/GUARD.md): 31% fewer encoded tokens than reading 512 characters every time, the same
# unsafe responses stopped (0.966), fewer safe ones (0.140 vs 0.163).
DEFAULT_OUTPUT_PREFILTER_CHARS = 192
DEFAULT_OUTPUT_PREFILTER_BELOW = 0.002
# Held flags (guard/stream.py): the stream stops only if the check after a flag scores >= this (0.5 = threshold).
# Off (0): the issue asks an unsafe verdict to stop generation at once. 0.1 was measured (docs/GUARD.md).
DEFAULT_OUTPUT_CONFIRM_SCORE = 0.0
# A guard check that takes longer than this is treated as a backend error (then fail-open/closed).
DEFAULT_TIMEOUT_SECONDS = 2.0
# `timeout_seconds` covers a conversation of up to this many characters; a longer one gets proportionally
# more (a judge's work grows with the text: the embedded classifier's int8 encoder takes ~0.3 s of one core
# per 8,192 characters, so a fixed 2 s made long prompts fail closed under load, never slow backends faster).
TIMEOUT_CHARS = 8_192
# Most characters one Moderate call may send (all messages). The embedded classifier's int8 encoder takes
# ~36 ms per 1,000 characters on one core (2026-11-29), so this is ~1.2 s: within DEFAULT_TIMEOUT_SECONDS,
# and a client cannot hold the encoder that every stream's output checks share with megabytes of text.
DEFAULT_MAX_MODERATE_CHARS = 32_768
# Moderate calls in progress at once; more are refused with RESOURCE_EXHAUSTED rather than queued.
DEFAULT_MAX_MODERATE_CALLS = 64
ERROR_BACKEND = "error"


class PolicyError(ValueError):
    """A policy or per-request option is invalid, or a request tried to loosen the policy."""


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    """Per-request policy changes; each may only make the deployment policy stricter.

    Args:
        block_categories: codes to block in addition (e.g. a category the deployment excludes).
        input_threshold: a lower block threshold for the input (User) checks.
        output_threshold: a lower block threshold for the output (Agent) checks.
        release_window_tokens: a smaller release window.
        fail_open: only False is stricter (fail closed on a backend error).
        stop_on_first_flag: True ends a stream at its first unsafe output check (no held flags).
    """

    block_categories: tuple[str, ...] = ()
    input_threshold: float | None = None
    output_threshold: float | None = None
    release_window_tokens: int | None = None
    fail_open: bool | None = None
    stop_on_first_flag: bool = False


def _check_threshold(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise PolicyError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True, slots=True)
class Policy:
    """A deployment's moderation policy.

    Args:
        enabled: built-in codes checked (default S1-S14; e.g. S1-S13 for Llama-Guard-3-1B).
        excluded: codes (built-in or custom) not checked: left out of the guard prompt, and a verdict
            naming only such codes counts as safe (llama-stack semantics).
        custom: deployment-defined categories, always checked unless excluded.
        input_threshold: block a User message when its unsafe score >= this.
        output_threshold: block an Agent message when its unsafe score >= this.
        fail_open: on a backend error or timeout, let the content pass (True) or block it (False, default).
        release_window_tokens: generated tokens held back between output checks.
        first_release_window_tokens: tokens before the first output check (capped at release_window_tokens);
            later windows double up to release_window_tokens.
        output_context_chars: an output check judges the answer's last this-many characters, reaching
            further back over any text no safe verdict covered yet (`guard.stream.judged_tail`).
        output_prefilter_chars: each output check first judges this shorter tail; 0 = no prefilter.
        output_prefilter_below: the prefilter's safe verdict settles a check when its score is below this;
            otherwise the `output_context_chars` tail is judged and decides. A request that lowers
            `output_threshold` lowers this bar in the same proportion (`tighten`).
        output_confirm_score: a flagged output check holds its window, and the stream stops only if the next
            check is unsafe or scores at least this (scaled like `output_prefilter_below`); 0: every flag stops.
        timeout_seconds: longest a single check of up to `TIMEOUT_CHARS` characters may take before it counts
            as a backend error; a longer conversation gets proportionally more (`FailSafeModerator`).
    """

    enabled: tuple[str, ...] = BUILTIN_CODES
    excluded: tuple[str, ...] = ()
    custom: tuple[Category, ...] = ()
    input_threshold: float = DEFAULT_THRESHOLD
    output_threshold: float = DEFAULT_THRESHOLD
    fail_open: bool = False
    release_window_tokens: int = DEFAULT_RELEASE_WINDOW_TOKENS
    first_release_window_tokens: int = DEFAULT_FIRST_RELEASE_WINDOW_TOKENS
    output_context_chars: int = DEFAULT_OUTPUT_CONTEXT_CHARS
    output_prefilter_chars: int = DEFAULT_OUTPUT_PREFILTER_CHARS
    output_prefilter_below: float = DEFAULT_OUTPUT_PREFILTER_BELOW
    output_confirm_score: float = DEFAULT_OUTPUT_CONFIRM_SCORE
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    _known: frozenset[str] = field(init=False, repr=False, compare=False)
    _active: tuple[Category, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for code in self.enabled:
            if not is_builtin(code):
                raise PolicyError(f"enabled codes must be built-in (S1-S14), got {code!r}")
        custom_codes = [c.code for c in self.custom]
        for code in custom_codes:
            if is_builtin(code):
                raise PolicyError(f"custom category code {code} collides with a built-in code")
        if len(set(custom_codes)) != len(custom_codes) or len(set(self.enabled)) != len(self.enabled):
            raise PolicyError("category codes must be unique")
        known = frozenset(BUILTIN_CODES) | frozenset(custom_codes)
        for code in self.excluded:
            if code not in known:
                raise PolicyError(f"excluded code {code!r} is not a known category")
        _check_threshold("input_threshold", self.input_threshold)
        _check_threshold("output_threshold", self.output_threshold)
        if self.release_window_tokens < 1:
            raise PolicyError(f"release_window_tokens must be >= 1, got {self.release_window_tokens}")
        if self.first_release_window_tokens < 1:
            raise PolicyError(f"first_release_window_tokens must be >= 1, got {self.first_release_window_tokens}")
        if self.output_context_chars < 1:
            raise PolicyError(f"output_context_chars must be >= 1, got {self.output_context_chars}")
        if self.output_prefilter_chars < 0:
            raise PolicyError(f"output_prefilter_chars must be >= 0, got {self.output_prefilter_chars}")
        _check_threshold("output_prefilter_below", self.output_prefilter_below)
        _check_threshold("output_confirm_score", self.output_confirm_score)
        if not (self.timeout_seconds > 0 and math.isfinite(self.timeout_seconds)):
            raise PolicyError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")
        excluded = set(self.excluded)
        active = [c for c in CATEGORIES if c.code in self.enabled and c.code not in excluded]
        active += [c for c in self.custom if c.code not in excluded]
        if not active:
            raise PolicyError("a policy must check at least one category")
        object.__setattr__(self, "_known", known)
        object.__setattr__(self, "_active", tuple(active))

    @property
    def first_window_tokens(self) -> int:
        """Tokens before the first output check as served: `first_release_window_tokens`, at most the window."""
        return first_window_size(self.release_window_tokens, self.first_release_window_tokens)

    @property
    def categories(self) -> tuple[Category, ...]:
        """The categories checked, in prompt order: enabled built-ins by code, then custom ones."""
        return self._active

    @property
    def active_codes(self) -> frozenset[str]:
        """Codes that block."""
        return frozenset(c.code for c in self._active)

    @property
    def known_codes(self) -> frozenset[str]:
        """Codes a backend may name (blocking or not): built-in and custom."""
        return self._known

    def threshold(self, role: Role) -> float:
        """The block threshold for judging `role`'s message (User: input, Agent: output)."""
        return self.input_threshold if role is Role.USER else self.output_threshold

    def tighten(self, options: PolicyOptions) -> Policy:
        """Apply per-request options, which may only make the policy stricter.

        Args:
            options: the request's options (None fields keep the deployment value).

        Returns:
            The stricter policy. Raises PolicyError if an option would loosen it or is invalid.
        """
        extra = tuple(options.block_categories)
        for code in extra:
            if code not in self._known:
                raise PolicyError(f"block_categories: unknown category code {code!r}")
        added = tuple(c for c in sort_codes(extra) if is_builtin(c) and c not in self.enabled)
        enabled = self.enabled + added
        excluded = tuple(c for c in self.excluded if c not in extra)
        output_threshold = _lower("output_threshold", self.output_threshold, options.output_threshold)
        # A lower output threshold lowers the prefilter's and the confirmation's bars in proportion: each sits as
        # far below this request's threshold as the deployment's bar is below its own.
        scale = output_threshold / self.output_threshold if output_threshold < self.output_threshold else 1.0
        return replace(
            self,
            enabled=tuple(sorted(enabled, key=code_sort_key)),
            excluded=excluded,
            input_threshold=_lower("input_threshold", self.input_threshold, options.input_threshold),
            output_threshold=output_threshold,
            output_prefilter_below=self.output_prefilter_below * scale,
            output_confirm_score=0.0 if options.stop_on_first_flag else self.output_confirm_score * scale,
            release_window_tokens=_smaller_window(self.release_window_tokens, options.release_window_tokens),
            fail_open=_stricter_fail_open(self.fail_open, options.fail_open),
        )

    def decide(
        self,
        role: Role,
        score: float,
        categories: Iterable[str] = (),
        *,
        backend: str,
        stage: Stage,
        latency: float = 0.0,
    ) -> Verdict:
        """Turn a backend's score and named categories into a verdict under this policy.

        Blocks when score >= threshold(role), unless the backend named categories and none of them is
        active (all excluded or not enabled): then the content is safe under this policy.

        Args:
            role: whose message was judged (selects the threshold).
            score: unsafe probability in [0, 1]; NaN or out of range raises ValueError (never "safe").
            categories: codes the backend named; an unknown code raises ValueError (a backend that
                names codes the policy cannot weigh is broken, and must not pass content as safe).
            backend: name of the deciding backend.
            stage: input / output / moderate.
            latency: seconds the backend took.

        Returns:
            The verdict; categories are the active named codes, sorted, empty when safe.
        """
        if not (0.0 <= score <= 1.0):
            raise ValueError(f"score must be in [0, 1], got {score}")
        named = tuple(categories)
        unknown = [c for c in named if c not in self._known]
        if unknown:
            raise ValueError(f"backend named {len(unknown)} unknown category code(s)")
        blocking = sort_codes(c for c in named if c in self.active_codes)
        unsafe = score >= self.threshold(role) and (not named or bool(blocking))
        return Verdict(
            safe=not unsafe,
            categories=blocking if unsafe else (),
            score=score,
            backend=backend,
            stage=stage,
            latency=latency,
        )

    def decide_scores(
        self,
        role: Role,
        score: float,
        category_scores: Mapping[str, float],
        *,
        backend: str,
        stage: Stage,
        latency: float = 0.0,
    ) -> Verdict:
        """`decide` for backends with an overall score and one score per category (a classifier head).

        The named categories are the known ones whose score reaches the threshold; when the overall
        score blocks but no category reaches it, the single highest-scoring known category is named,
        so that excluding that category still lets the content pass.

        Args:
            role: whose message was judged.
            score: overall unsafe probability in [0, 1].
            category_scores: code -> probability; unknown codes are ignored.
            backend: name of the deciding backend.
            stage: input / output / moderate.
            latency: seconds the backend took.

        Returns:
            The verdict, as `decide`.
        """
        threshold = self.threshold(role)
        known = {c: s for c, s in category_scores.items() if c in self._known}
        named: Sequence[str] = [c for c, s in known.items() if s >= threshold]
        if not named and known and score >= threshold:
            named = [max(known, key=lambda c: known[c])]
        return self.decide(role, score, named, backend=backend, stage=stage, latency=latency)

    def on_backend_error(self, stage: Stage, exc: BaseException, *, latency: float = 0.0) -> Verdict:
        """The verdict when a backend failed or timed out: fail open (safe) or closed (unsafe).

        Logs the exception type only: its message may quote the judged text.

        Args:
            stage: where the check failed.
            exc: what failed.
            latency: seconds spent before the failure.

        Returns:
            A verdict with error=True and backend "error"; score 1.0 when closed, 0.0 when open.
        """
        mode = "open" if self.fail_open else "closed"
        logger.warning(
            "guard backend failed at %s stage (%s); failing %s", stage.value, type(exc).__name__, mode
        )
        return Verdict(
            safe=self.fail_open,
            score=0.0 if self.fail_open else 1.0,
            backend=ERROR_BACKEND,
            stage=stage,
            latency=latency,
            error=True,
        )


def _lower(name: str, current: float, requested: float | None) -> float:
    if requested is None:
        return current
    _check_threshold(name, requested)
    if requested > current:
        raise PolicyError(f"{name} may only be lowered, got {requested} > {current}")
    return requested


def _smaller_window(current: int, requested: int | None) -> int:
    if requested is None:
        return current
    if requested < 1:
        raise PolicyError(f"release_window_tokens must be >= 1, got {requested}")
    if requested > current:
        raise PolicyError(f"release_window_tokens may only be reduced, got {requested} > {current}")
    return requested


def _stricter_fail_open(current: bool, requested: bool | None) -> bool:
    if requested is None:
        return current
    if requested and not current:
        raise PolicyError("fail_open may only be turned off, got true on a fail-closed policy")
    return requested
