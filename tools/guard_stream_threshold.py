"""The output stage's per-stream threshold: a stream is judged at every release window, and any flag ends it.

The head's output threshold is chosen for one judgment of a whole text. A stream is judged many times (after
4, 12, 28 tokens, then every 16, each check reading the answer's tail), so a safe answer is stopped more often
than it is flagged whole: on the dev split's safe Agent rows, 13% of streams against 8% of whole answers with
the shipped head. The rule here (registered in data/guard_candidates/README.md before it was computed):

    replay the dev split's safe Agent rows through the default output schedule with a head trained on the
    train split (on the shipped encoder, whose adapter never saw the dev split), and take the lowest raw
    output threshold (grid 0.005, not below the output threshold) at which the share of those streams stopped
    is no more than the share of the same rows flagged when judged whole at the output threshold.

The head carries the difference as `stream_offset` (applied at `Stage.OUTPUT` only: `Moderate` calls with the
Agent role are single whole judgments and keep the output threshold). The check points come from the served
model's tokenizer, so a head for another served model is calibrated with that model's tokenizer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from guard.backends.classifier import ClassifierModerator, Head
from guard.features import FeatureExtractor, FloatArray
from guard.moderator import Message, Role, Stage, Verdict
from guard.policy import (
    DEFAULT_FIRST_RELEASE_WINDOW_TOKENS,
    DEFAULT_OUTPUT_CONTEXT_CHARS,
    DEFAULT_OUTPUT_PREFILTER_BELOW,
    DEFAULT_OUTPUT_PREFILTER_CHARS,
    DEFAULT_RELEASE_WINDOW_TOKENS,
)
from guard.stream import check_points, judged_tail, prefilter_tail, text_stream_guard
from service.text.detokenizer import StreamingDetokenizer
from service.text.tokenizer import Tokenizer as ServedTokenizer

LOG = logging.getLogger("guard_stream_threshold")
FIRST_WINDOW, WINDOW = DEFAULT_FIRST_RELEASE_WINDOW_TOKENS, DEFAULT_RELEASE_WINDOW_TOKENS  # the default schedule
STEP, TOP = 0.005, 0.95


@dataclass(frozen=True)
class StreamThreshold:
    """The chosen raw per-stream output threshold and what it was chosen on."""

    threshold: float
    output_threshold: float
    rows: int
    whole_fpr: float
    stream_fpr_before: float
    stream_fpr_after: float

    def as_metadata(self, tokenizer: str) -> dict[str, object]:
        """The head JSON's record of the choice."""
        return {"raw_threshold": self.threshold, "raw_output_threshold": self.output_threshold,
                "dev_safe_agent_rows": self.rows, "whole_fpr_at_output_threshold": self.whole_fpr,
                "stream_fpr_at_output_threshold": self.stream_fpr_before,
                "stream_fpr_at_stream_threshold": self.stream_fpr_after, "tokenizer": tokenizer,
                "schedule": f"first {FIRST_WINDOW}, doubling to {WINDOW}; last {DEFAULT_OUTPUT_CONTEXT_CHARS} chars, "
                            f"prefilter {DEFAULT_OUTPUT_PREFILTER_CHARS}"}


def choose_stream_threshold(whole: FloatArray, worst: FloatArray, output_threshold: float) -> StreamThreshold:
    """The rule above, on safe rows' whole-text scores and their streams' worst check scores.

    Args:
        whole: (n,) raw scores of the safe rows judged whole.
        worst: (n,) the highest raw score over each row's streamed checks.
        output_threshold: the head's raw output threshold.

    Returns:
        The lowest grid threshold >= `output_threshold` whose stream FPR is <= the whole-text FPR at
        `output_threshold` (`TOP` when none is).
    """
    if len(whole) == 0 or len(whole) != len(worst):
        raise ValueError("need the same, non-zero number of whole and stream scores")
    target = float((whole >= output_threshold).mean())
    chosen = TOP
    steps = round((TOP - output_threshold) / STEP)
    for t in (round(output_threshold + k * STEP, 6) for k in range(max(0, steps) + 1)):  # no drift from summing
        if float((worst >= t).mean()) <= target:
            chosen = t
            break
    return StreamThreshold(chosen, output_threshold, len(whole), target,
                           float((worst >= output_threshold).mean()), float((worst >= chosen).mean()))


async def replay_checks(score: Callable[[str], Awaitable[float]], prefix_of: Callable[[int], str],
                        points: Sequence[int], context_chars: int, prefilter_chars: int,
                        prefilter_below: float) -> tuple[float, int]:
    """One stream's output checks as `StreamGuard` makes them: at each check point (tokens so far) the judged tail
    of the answer, settled by its short prefilter tail when that scores below `prefilter_below`.

    Args:
        score: a text's output-stage score.
        prefix_of: the answer's text after k tokens.
        points: the check points (`guard.stream.check_points`).
        context_chars: guard.output_context_chars.
        prefilter_chars: guard.output_prefilter_chars (0: no prefilter).
        prefilter_below: guard.output_prefilter_below.

    Returns:
        (the worst check's score, 0 without checks; the characters the checks read).
    """
    cleared, worst, read = 0, 0.0, 0
    for k in points:
        text = prefix_of(k)
        tail = judged_tail(text, cleared, context_chars)
        short = prefilter_tail(text, cleared, tail, prefilter_chars)
        settled = short is not None and await score(short) < prefilter_below
        worst = max(worst, await score(short if short is not None and settled else tail))
        read += (len(short) if short is not None else 0) + (0 if settled else len(tail))
        cleared = len(text)
    return worst, read


@functools.cache
def _served_tokenizer(tokenizer: Tokenizer) -> ServedTokenizer:
    # a copy: the served wrapper reconfigures the tokenizer it is given (special tokens inert)
    return ServedTokenizer(Tokenizer.from_str(tokenizer.to_str()), {})


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """One text piece per token, as the server streams them: through the served `StreamingDetokenizer` (a token
    ending inside a character gives an empty piece until the character completes; the pieces concatenate to
    every decoded prefix), in time linear in the answer."""
    detokenizer = StreamingDetokenizer(_served_tokenizer(tokenizer))
    pieces = [detokenizer.add(i) for i in ids]
    if pieces:
        pieces[-1] += detokenizer.flush()
    return pieces


async def replay_guard(score: Callable[[str], Awaitable[float]], pieces: Sequence[str], window: int,
                       first_window: int, context_chars: int, prefilter_chars: int, prefilter_below: float,
                       threshold: float, confirm_score: float | None) -> tuple[bool, int]:
    """One stream through `StreamGuard` itself, a check flagging when its score reaches `threshold`.

    Unlike `replay_checks` (whose worst score decides every threshold at once), this follows the guard's own
    decisions, so it also replays held flags (`confirm_score`, where a flag changes what later checks read).

    Returns:
        (whether the stream was stopped, the characters its checks read).
    """
    read = 0

    async def judge(text: str) -> Verdict:
        nonlocal read
        read += len(text)
        value = await score(text)
        return Verdict(value < threshold, (), value, "replay", Stage.OUTPUT)

    guard = text_stream_guard(judge, window, first_window=first_window, context_chars=context_chars,
                              prefilter_chars=prefilter_chars or None, prefilter_below=prefilter_below,
                              confirm_score=confirm_score)
    for piece in pieces:
        await guard.feed(piece)
        if guard.blocked:
            return True, read
    await guard.finish()
    return guard.blocked, read


def output_scorer(moderator: ClassifierModerator) -> Callable[[str], Awaitable[float]]:
    """A text's score as a stream's output check reads it (an Agent turn at `Stage.OUTPUT`, with a shipped head's
    stream offset; a training head carries no offsets, so whole texts read the same), cached per text."""
    cache: dict[str, float] = {}

    async def score(t: str) -> float:
        if t not in cache:
            cache[t] = (await moderator.moderate([Message("assistant", t)], Role.AGENT, Stage.OUTPUT)).score
        return cache[t]

    return score


async def stream_scores(moderator: ClassifierModerator, text: str, tokenizer: Tokenizer) -> tuple[float, float]:
    """(whole-text score, worst check score) of one answer as the default schedule streams it, both read as
    the output stage reads them (with a shipped head's stream offset)."""
    score = output_scorer(moderator)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    points = check_points(len(ids), WINDOW, FIRST_WINDOW)
    worst, _ = await replay_checks(score, lambda k: tokenizer.decode(ids[:k]), points, DEFAULT_OUTPUT_CONTEXT_CHARS,
                                   DEFAULT_OUTPUT_PREFILTER_CHARS, DEFAULT_OUTPUT_PREFILTER_BELOW)
    return await score(text), worst


def stream_threshold(head: Head, extractor: FeatureExtractor, texts: Sequence[str], tokenizer_path: Path,
                     output_threshold: float) -> StreamThreshold:
    """Replay safe answers through the default schedule with an uncalibrated head; choose the threshold.

    Args:
        head: a head trained without `texts` (raw scores: no calibration, no offsets).
        extractor: the encoder it was trained on.
        texts: safe Agent rows (the dev split's).
        tokenizer_path: the served model's tokenizer.json (it sets where the checks fall).
        output_threshold: the head's raw output threshold.

    Returns:
        The choice.
    """
    moderator = ClassifierModerator(extractor, head)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    async def run() -> list[tuple[float, float]]:
        return [await stream_scores(moderator, t, tokenizer) for t in texts]

    pairs = asyncio.run(run())
    choice = choose_stream_threshold(np.array([w for w, _ in pairs]), np.array([s for _, s in pairs]),
                                     output_threshold)
    LOG.info("per-stream output threshold %.3f (output threshold %.3f): %d safe Agent rows, whole FPR %.3f, "
             "streams stopped %.3f -> %.3f", choice.threshold, output_threshold, choice.rows, choice.whole_fpr,
             choice.stream_fpr_before, choice.stream_fpr_after)
    return choice
