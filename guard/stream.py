"""The output-side release window: streamed text reaches the client only after a safe verdict covers it.

`StreamGuard` holds generated pieces back and asks an injected judge about the generated text so far (or
its recent tail, `context_chars`, always reaching back over every uncleared character) every `window`
pieces and once more at the end. The first windows can be shorter (`first_window`, then
doubling up to `window`): the client's first text then waits for a few judged tokens instead of a whole
window, while the bound on withheld text (below) stays `window`. A safe verdict releases everything it
covered; an unsafe one closes the guard for good: nothing more is released, whatever is fed after.

Invariant (tested with hypothesis): the released pieces always concatenate to a prefix of the text that
the last safe verdict covered, and no piece is released after an unsafe verdict.

What the window bounds: released text was judged safe when released, but a later verdict over more
context may find the answer unsafe; the client then holds only text that was cleared, and at most
`window` generated pieces past the last safe verdict are withheld. A smaller window detects earlier and
releases sooner, at the price of more judge calls. The latency added is measured per piece: the time
from `feed` to its release (`StreamGuardStats.release_delay_seconds`).

A prefilter (`prefilter_chars`) makes most checks cheaper: each check first judges a shorter tail (still
reaching back over all uncleared text), and only when that verdict is not clearly safe (unsafe, an error, or
a score at or above `prefilter_below`) judges the full tail, whose verdict then decides. Released text is
still always covered by a safe verdict; what the prefilter gives up is the wider context for text whose short
tail looks clearly safe.

Confirmation (`confirm_score`): a flagged check does not end the stream at once. Its window stays held, and the
next check (over the held text and the next window) decides: the stream stops if that check is unsafe too or
scores at least `confirm_score`, else everything held is released under that safe verdict. A lone flag on a
fragment (a refusal's first clause restating the request) is the commonest false stop, and the longer text
clears it. A flag at the stream's final check, or with nothing new to judge after it, or from a backend error,
stops at once, and a confirming check that errs (fail-open) lets the flag stand; at most two windows are ever
withheld.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, Literal, TypeVar

from guard.moderator import Verdict

T = TypeVar("T")

# Judges the generated text so far (or its tail, see `judged_tail`); the closure owns the conversation and
# the stage. It should not raise (wrap the moderator in `guard.failsafe.FailSafeModerator`): if it does, the
# exception propagates and the guard is closed, so nothing more is released.
Judge = Callable[[str], Awaitable[Verdict]]

# How a check reached its deciding verdict: one read of the full tail (no prefilter, or the short tail would
# be no shorter), settled by the prefilter's short tail, or escalated from it to the full tail.
CheckRead = Literal["full", "prefilter", "escalated"]
# The reads a prefiltered check can end with (the label values of the prefilter metric).
PrefilterOutcome = Literal["prefilter", "escalated"]


def first_window_size(window: int, first_window: int | None) -> int:
    """Pieces before the first check: `first_window` capped at `window` (no first window: `window`)."""
    return window if first_window is None else min(first_window, window)


def next_window(size: int, window: int) -> int:
    """The window after one of `size` pieces: doubled, at most `window` (the first windows grow to it)."""
    return min(2 * size, window)


def judged_tail(text: str, cleared: int, context_chars: int | None) -> str:
    """What an output check reads: the last `context_chars` characters of `text`, reaching further back
    when needed to cover everything after the first `cleared` characters (the text the last safe verdict
    covered). So no character is ever released unjudged, however long a window's tokens are or however
    small the context; `None` reads the whole text.
    """
    if context_chars is None:
        return text
    return text[min(max(0, len(text) - context_chars), cleared):]


def prefilter_tail(text: str, cleared: int, tail: str, prefilter_chars: int | None) -> str | None:
    """What a prefilter reads before `tail` (a check's full `judged_tail`): the shorter tail under the same
    reach-back rule, or None when there is no prefilter or it would read no less than `tail` (then the one
    full call suffices). Benchmarks replaying checks use it too."""
    if not prefilter_chars:
        return None
    short = judged_tail(text, cleared, prefilter_chars)
    return short if len(short) < len(tail) else None


def check_points(pieces: int, window: int, first_window: int | None = None) -> list[int]:
    """Piece counts at which `StreamGuard` judges a stream of `pieces` pieces, the last at `finish`
    (benchmarks replay streams through the same schedule)."""
    points: list[int] = []
    pos, size = 0, first_window_size(window, first_window)
    while pos + size < pieces:
        pos += size
        points.append(pos)
        size = next_window(size, window)
    return [*points, pieces]


@dataclass(slots=True)
class StreamGuardStats:
    """Counters for metrics; times are seconds of the injected clock.

    Args:
        judge_calls: verdicts asked for (a prefiltered check that escalates asks for two).
        checks: checks decided (one deciding verdict each, however many reads it took).
        prefilter_passes: checks settled by the prefilter's short tail alone.
        flags_confirmed: held flags the next check confirmed (the stream stopped).
        flags_cleared: held flags the next check cleared (the held text was released).
        prefilter_escalations: checks whose short tail was not clearly safe, so the full tail decided.
        judged_tokens: pieces covered, summed over calls (a judge re-reads the whole text each time).
        tokens_fed: pieces received.
        tokens_released: pieces released.
        tokens_withheld: pieces never released because of an unsafe verdict or a judge failure.
        judge_seconds: total time awaiting the judge.
        max_judge_seconds: longest single judge call.
        release_delay_seconds: summed over released pieces, time from feed to release.
        max_release_delay_seconds: the longest such delay.
    """

    judge_calls: int = 0
    checks: int = 0
    prefilter_passes: int = 0
    prefilter_escalations: int = 0
    flags_confirmed: int = 0
    flags_cleared: int = 0
    judged_tokens: int = 0
    tokens_fed: int = 0
    tokens_released: int = 0
    tokens_withheld: int = 0
    judge_seconds: float = 0.0
    max_judge_seconds: float = 0.0
    release_delay_seconds: float = 0.0
    max_release_delay_seconds: float = 0.0


class StreamGuard(Generic[T]):
    """Releases streamed items (token texts, or token events) only once a safe verdict covers them.

    Args:
        judge: async verdict over all generated text so far.
        window: pieces between checks (>= 1); every `feed` counts as one piece, even an empty one.
        text_of: the text of an item (`str` for plain strings).
        clock: monotonic seconds; injected so tests need no sleeping.
        first_window: pieces before the first check (>= 1, default `window`, capped at `window`); each
            later window doubles until it reaches `window`.
        context_chars: the judge gets the text's last this-many characters, extended back over any text
            no safe verdict covered yet (`judged_tail`); default: the whole text.
        prefilter_chars: judge this shorter tail first (same extension); None = no prefilter.
        prefilter_below: a prefilter verdict settles the check only when safe with a score below this.
        on_decision: called once per check with its deciding verdict and how it was read (`CheckRead`);
            an escalated check's verdict carries the latency of both reads. Metrics record verdicts here,
            so a check counts once however many reads it took.
        confirm_score: hold a flagged check's window for the next check, and stop only if that one is unsafe
            or scores at least this (see the module doc); None: every flag stops the stream.
    """

    def __init__(
        self,
        judge: Judge,
        window: int,
        text_of: Callable[[T], str],
        clock: Callable[[], float] = time.perf_counter,
        first_window: int | None = None,
        context_chars: int | None = None,
        prefilter_chars: int | None = None,
        prefilter_below: float = 0.0,
        on_decision: Callable[[Verdict, CheckRead], None] | None = None,
        confirm_score: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if first_window is not None and first_window < 1:
            raise ValueError(f"first_window must be >= 1, got {first_window}")
        if context_chars is not None and context_chars < 1:
            raise ValueError(f"context_chars must be >= 1, got {context_chars}")
        if prefilter_chars is not None and prefilter_chars < 1:
            raise ValueError(f"prefilter_chars must be >= 1, got {prefilter_chars}")
        self._judge = judge
        self._context_chars = context_chars
        self._prefilter_chars = prefilter_chars
        self._prefilter_below = prefilter_below
        self._on_decision = on_decision
        self._confirm_score = confirm_score
        self._held: tuple[Verdict, str] | None = None  # a flag awaiting the next check: its verdict and text
        self._window = window
        self._next_window = first_window_size(window, first_window)
        self._text_of = text_of
        self._clock = clock
        self._parts: list[str] = []
        self._pending: list[tuple[T, float]] = []  # (item, time fed)
        self._unjudged = 0  # pieces fed since the last check (`_pending` also holds a held flag's window)
        self._cleared_text: str | None = None  # text covered by the last safe verdict
        self._verdict: Verdict | None = None
        self._closed = False  # after an unsafe verdict or a judge failure
        self._finished = False
        self.stats = StreamGuardStats()

    @property
    def window(self) -> int:
        """Pieces between checks, once the first windows have grown to it."""
        return self._window

    @property
    def next_window(self) -> int:
        """Pieces the current window holds before its check."""
        return self._next_window

    @property
    def blocked(self) -> bool:
        """True once an unsafe verdict (or a judge failure) closed the guard."""
        return self._closed

    @property
    def verdict(self) -> Verdict | None:
        """The latest verdict (the blocking one once blocked)."""
        return self._verdict

    async def feed(self, item: T) -> list[T]:
        """Take one generated piece; judge when a window is full.

        Args:
            item: the next piece.

        Returns:
            The pieces released now, oldest first (empty while the window fills, and forever once blocked).
        """
        if self._finished:
            raise RuntimeError("stream guard already finished")
        self.stats.tokens_fed += 1
        if self._closed:
            self.stats.tokens_withheld += 1
            return []
        self._parts.append(self._text_of(item))
        self._pending.append((item, self._clock()))
        self._unjudged += 1
        if self._unjudged < self._next_window:
            return []
        self._unjudged = 0
        self._next_window = next_window(self._next_window, self._window)
        return await self._check()

    async def finish(self) -> tuple[list[T], Verdict]:
        """End of generation: judge what is still held back.

        Returns:
            (released pieces, final verdict). Once blocked: ([], the blocking verdict). An empty
            generation is judged too, so there is always a verdict.
        """
        if self._finished:
            raise RuntimeError("stream guard already finished")
        self._finished = True
        if self._closed:
            if self._verdict is None:
                raise RuntimeError("stream guard failed: its judge raised")
            return [], self._verdict
        released = await self._check(final=True) if self._pending or self._verdict is None else []
        if self._verdict is None:  # unreachable: _check sets it or raises
            raise RuntimeError("stream guard has no verdict")
        return released, self._verdict

    async def _check(self, final: bool = False) -> list[T]:
        text = "".join(self._parts)
        if text == self._cleared_text:
            # Only empty pieces since the last safe verdict (e.g. a detokenizer holding partial UTF-8):
            # the text is already covered, a new call would judge the very same string.
            return self._release()
        held, self._held = self._held, None
        if held is not None and text == held[1]:
            return self._block(held[0])  # nothing new to judge since the flag: it stands
        cleared = len(self._cleared_text) if self._cleared_text is not None else 0
        tail = judged_tail(text, cleared, self._context_chars)
        verdict, read = await self._decide(text, cleared, tail)
        self._verdict = verdict
        self.stats.checks += 1
        if self._on_decision is not None:
            self._on_decision(verdict, read)
        if held is not None:
            # a failed confirming check (a fail-open error verdict) cannot clear the flag: it stands
            if not verdict.safe or verdict.error or verdict.score >= (self._confirm_score or 0.0):
                self.stats.flags_confirmed += 1
                return self._block(verdict if not verdict.safe else held[0])
            self.stats.flags_cleared += 1
        elif not verdict.safe:
            if self._confirm_score is None or final or verdict.error:
                return self._block(verdict)
            self._held = (verdict, text)
            return []
        self._cleared_text = text
        return self._release()

    async def _decide(self, text: str, cleared: int, tail: str) -> tuple[Verdict, CheckRead]:
        """One check's deciding verdict: the short tail's when it is clearly safe, else the full tail's."""
        short = prefilter_tail(text, cleared, tail, self._prefilter_chars)
        if short is None:
            return await self._timed_judge(tail), "full"
        first = await self._timed_judge(short)
        if first.safe and not first.error and first.score < self._prefilter_below:
            self.stats.prefilter_passes += 1
            return first, "prefilter"
        self.stats.prefilter_escalations += 1
        verdict = await self._timed_judge(tail)
        return replace(verdict, latency=first.latency + verdict.latency), "escalated"

    async def _timed_judge(self, text: str) -> Verdict:
        start = self._clock()
        try:
            verdict = await self._judge(text)
        except BaseException:
            self._close()
            raise
        finally:
            elapsed = self._clock() - start
            self.stats.judge_calls += 1
            self.stats.judged_tokens += len(self._parts)
            self.stats.judge_seconds += elapsed
            self.stats.max_judge_seconds = max(self.stats.max_judge_seconds, elapsed)
        return verdict

    def _block(self, verdict: Verdict) -> list[T]:
        self._verdict = verdict
        self._close()
        return []

    def _close(self) -> None:
        self._closed = True
        self.stats.tokens_withheld += len(self._pending)
        self._pending.clear()

    def _release(self) -> list[T]:
        now = self._clock()
        for _, fed_at in self._pending:
            delay = now - fed_at
            self.stats.release_delay_seconds += delay
            self.stats.max_release_delay_seconds = max(self.stats.max_release_delay_seconds, delay)
        items = [item for item, _ in self._pending]
        self._pending.clear()
        self.stats.tokens_released += len(items)
        return items


def text_stream_guard(
    judge: Judge, window: int, clock: Callable[[], float] = time.perf_counter, first_window: int | None = None,
    context_chars: int | None = None, prefilter_chars: int | None = None, prefilter_below: float = 0.0,
    on_decision: Callable[[Verdict, CheckRead], None] | None = None, confirm_score: float | None = None,
) -> StreamGuard[str]:
    """A `StreamGuard` over plain text pieces.

    Args:
        judge: async verdict over all generated text so far.
        window: pieces between checks.
        clock: monotonic seconds.
        first_window: pieces before the first check (see `StreamGuard`).
        context_chars: characters each check reads (see `judged_tail`).
        prefilter_chars: a shorter tail judged first (see `StreamGuard`).
        prefilter_below: score under which the prefilter's safe verdict settles a check.
        on_decision: called with each check's deciding verdict (see `StreamGuard`).
        confirm_score: hold a flag for the next check to confirm (see `StreamGuard`); None: every flag stops.

    Returns:
        The guard.
    """
    return StreamGuard(judge, window, text_of=str, clock=clock, first_window=first_window,
                       context_chars=context_chars, prefilter_chars=prefilter_chars,
                       prefilter_below=prefilter_below, on_decision=on_decision, confirm_score=confirm_score)
