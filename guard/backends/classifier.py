"""The embedded default moderation backend: a small trained head over sentence features.

Math (numpy only; the head file is written by `tools/train_guard.py`):
    z = (x - mean) / scale                            x: (rows, dim) features
    h = relu(z @ hidden_w + hidden_b)                 only when the head has a hidden layer, else h = z
    logits = h @ out_w + out_b                        (rows, 1 + n_categories): column 0 is "unsafe"
    scores = sigmoid(logits)
A text's scores are the maxima over its rows (windows). Agent turns' overall score is shifted in logit space
by the head's `agent_offset` (logit of its output threshold minus logit of its input threshold), and at the
streamed output stage further by its `stream_offset` (a stream is judged at every release window and any flag
ends it, so its threshold is chosen per stream: tools/guard_stream_threshold.py), so each stage's chosen
threshold maps to 0.5. The verdict is unsafe when the overall score reaches the threshold for
the stage; its categories are those whose score reaches their own threshold, or the single highest-scoring
one when none does (an unsafe verdict always names one).
Every judged text (input and `Moderate` turns, output tails) is judged together with its decoded views
(`guard.views`: base64, leetspeak, reversed or spelled-out payloads undone), so an encoded request or answer
scores as the text it encodes; ordinary text has none.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.features import FeatureBatch, FeatureExtractor, FloatArray, WindowedExtractor, max_per_owner
from guard.moderator import Message, Role, Stage, Verdict
from guard.views import with_decoded_views
from guard.worker import BACKGROUND, DEFAULT_PRIORITY, URGENT, PriorityWorker

BACKEND_NAME = "classifier"
_ROLE_OF = {Role.USER: "user", Role.AGENT: "assistant"}
# On a `PriorityWorker`, an input verdict (a request waits for it before its first token) overtakes queued
# output checks (each holds only a window's release while the engine keeps generating), and both overtake
# queued Moderate calls: those are not bounded by the engine's admission, so however many other services send,
# they cannot starve the running streams' checks into timeouts (a starved Moderate call times out itself).
STAGE_PRIORITY = {Stage.INPUT: URGENT, Stage.OUTPUT: DEFAULT_PRIORITY, Stage.MODERATE: BACKGROUND}
# On a `PriorityWorker`, a windowed extractor encodes a long text's windows in slices of at most this many
# tokens, each a separate call: calls queued meanwhile (other streams' output checks, input verdicts) run
# between the slices, so one long text holds the encoder for one slice at a time instead of its whole length
# (a 256-token window is ~40 ms; 100,000 characters ~3.6 s), and a call that timed out or was cancelled stops
# after its current slice. A typical check (one window) is still one call.
SLICE_TOKENS = 512


def shift_logit(p: FloatArray, offset: float) -> FloatArray:
    """sigmoid(logit(p) - offset), elementwise (float32): scores read at a threshold `offset` logits higher."""
    q = np.clip(p.astype(np.float64), 1e-12, 1.0 - 1e-12)
    out: FloatArray = (1.0 / (1.0 + np.exp(-(np.log(q / (1.0 - q)) - offset)))).astype(np.float32)
    return out


def slice_end(windows: Sequence[Sequence[int]], start: int, budget: int = SLICE_TOKENS) -> int:
    """End (exclusive) of the slice of `windows` from `start`: as many as fit in `budget` tokens, at least one."""
    end, used = start, 0
    while end < len(windows) and (end == start or used + len(windows[end]) <= budget):
        used += len(windows[end])
        end += 1
    return end


@dataclass(frozen=True)
class Head:
    """A trained head. Arrays as in the module docstring; `hidden_w` is None for a linear head.

    Args:
        feature_name: the feature space the head was trained on (checked against the extractor).
        categories: category codes of output columns 1.., e.g. ("S1", ..., "S14").
        mean: (dim,) feature mean.
        scale: (dim,) feature scale (no zeros).
        hidden_w: (dim, hidden) or None.
        hidden_b: (hidden,) or None.
        out_w: (hidden or dim, 1 + len(categories)).
        out_b: (1 + len(categories),).
        threshold: overall unsafe threshold in [0, 1].
        category_thresholds: (len(categories),) per-category thresholds.
        agent_offset: subtracted from the overall logit of Agent turns (`for_role`): a head calibrated with
            separate input and output thresholds (tools/guard_thresholds.py) maps both to 0.5; 0 for one.
        stream_offset: subtracted further from it for Agent turns at `Stage.OUTPUT` (the streamed checks):
            logit of the per-stream output threshold minus logit of the output threshold; 0 for none.
    """

    feature_name: str
    categories: tuple[str, ...]
    mean: FloatArray
    scale: FloatArray
    hidden_w: FloatArray | None
    hidden_b: FloatArray | None
    out_w: FloatArray
    out_b: FloatArray
    threshold: float
    category_thresholds: FloatArray
    agent_offset: float = 0.0
    stream_offset: float = 0.0

    def __post_init__(self) -> None:
        width = self.out_w.shape[1]
        if width != 1 + len(self.categories) or self.out_b.shape != (width,):
            raise ValueError(f"head has {width} output columns for {len(self.categories)} categories")
        if self.category_thresholds.shape != (len(self.categories),):
            raise ValueError("category_thresholds must have one entry per category")
        if (self.hidden_w is None) != (self.hidden_b is None):
            raise ValueError("hidden_w and hidden_b come together")

    def scores(self, x: FloatArray) -> FloatArray:
        """Sigmoid scores for feature rows.

        Args:
            x: (rows, dim) features.

        Returns:
            (rows, 1 + n_categories) scores in [0, 1]; column 0 is the overall unsafe score.
        """
        h = (x.astype(np.float32) - self.mean) / self.scale
        if self.hidden_w is not None and self.hidden_b is not None:
            h = np.maximum(h @ self.hidden_w + self.hidden_b, 0.0)
        logits = h @ self.out_w + self.out_b
        # clip so exp never overflows; sigmoid(+-40) is 0/1 in float32 anyway
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -40.0, 40.0)))).astype(np.float32)

    def for_role(self, scores: FloatArray, role: Role, stage: Stage | None = None) -> FloatArray:
        """Per-text scores as the stage of `role` reads them: Agent turns' overall column shifted by
        `agent_offset`, and by `stream_offset` too at `Stage.OUTPUT` (monotone maps, so rankings within a role
        and stage are unchanged).

        Args:
            scores: (texts, 1 + n_categories) from `scores` (maxed per text).
            role: whose turns they are.
            stage: where they are judged (`Stage.OUTPUT`: a stream's checks); None reads as a whole judgment.

        Returns:
            `scores` itself for User turns or a zero offset, else a shifted copy.
        """
        offset = self.agent_offset + (self.stream_offset if stage is Stage.OUTPUT else 0.0)
        if role is not Role.AGENT or not offset or scores.shape[0] == 0:
            return scores
        out = scores.copy()
        out[:, 0] = shift_logit(out[:, 0], offset)
        return out

    def categories_for(self, category_scores: FloatArray) -> tuple[str, ...]:
        """Categories named by an unsafe verdict.

        Args:
            category_scores: (n_categories,) scores of one text.

        Returns:
            Codes at or above their threshold, in head order; the top one if none is.
        """
        hit = [c for c, s, t in zip(self.categories, category_scores, self.category_thresholds, strict=True)
               if s >= t]
        return tuple(hit) if hit else (self.categories[int(np.argmax(category_scores))],)


def load_head(path: Path) -> Head:
    """Read a head `.npz` (no pickles).

    Args:
        path: the .npz written by `save_head`.

    Returns:
        The head.
    """
    with np.load(path, allow_pickle=False) as z:
        hidden = "hidden_w" in z.files
        return Head(
            feature_name=str(z["feature_name"]), categories=tuple(str(c) for c in z["categories"]),
            mean=z["mean"].astype(np.float32), scale=z["scale"].astype(np.float32),
            hidden_w=z["hidden_w"].astype(np.float32) if hidden else None,
            hidden_b=z["hidden_b"].astype(np.float32) if hidden else None,
            out_w=z["out_w"].astype(np.float32), out_b=z["out_b"].astype(np.float32),
            threshold=float(z["threshold"]), category_thresholds=z["category_thresholds"].astype(np.float32),
            agent_offset=float(z["agent_offset"]) if "agent_offset" in z.files else 0.0,
            stream_offset=float(z["stream_offset"]) if "stream_offset" in z.files else 0.0,
        )


def save_head(head: Head, path: Path) -> None:
    """Write a head as a compressed `.npz` (float32, no pickles).

    Args:
        head: the head.
        path: destination file.
    """
    arrays: dict[str, np.ndarray] = {
        "feature_name": np.array(head.feature_name), "categories": np.array(head.categories),
        "mean": head.mean, "scale": head.scale, "out_w": head.out_w, "out_b": head.out_b,
        "threshold": np.array(head.threshold, dtype=np.float32),
        "category_thresholds": head.category_thresholds,
        "agent_offset": np.array(head.agent_offset, dtype=np.float64),
        "stream_offset": np.array(head.stream_offset, dtype=np.float64),
    }
    if head.hidden_w is not None and head.hidden_b is not None:
        arrays["hidden_w"], arrays["hidden_b"] = head.hidden_w, head.hidden_b
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez_compressed(fh, allow_pickle=False, **arrays)


def texts_to_judge(conversation: Sequence[Message], role: Role, stage: Stage) -> list[str]:
    """The turns a verdict covers.

    Args:
        conversation: all turns.
        role: whose turns are judged.
        stage: OUTPUT judges only the last turn of `role` (earlier ones were judged when they were made);
            INPUT and MODERATE judge every turn of `role`, since a request can be spread over turns.

    Returns:
        The texts, possibly empty.
    """
    turns = [m.content for m in conversation if m.role == _ROLE_OF[role]]
    return turns[-1:] if stage is Stage.OUTPUT else turns


class ClassifierModerator:
    """`Moderator` over a `FeatureExtractor` and a `Head`; the extractor runs in `executor`.

    Args:
        extractor: featuriser whose `name` must equal the head's `feature_name`.
        head: the trained head.
        executor: where the blocking extractor runs (None = the loop's default thread pool); on a
            `PriorityWorker`, input verdicts go first (`STAGE_PRIORITY`).
        input_threshold: overall threshold for User turns (defaults to the head's, 0.5 for a calibrated
            head; pass the policy's `input_threshold` to follow a deployment's policy).
        output_threshold: overall threshold for Agent turns (defaults to the head's).
    """

    def __init__(self, extractor: FeatureExtractor, head: Head, executor: Executor | None = None,
                 input_threshold: float | None = None, output_threshold: float | None = None) -> None:
        if extractor.name != head.feature_name:
            raise ValueError(f"head was trained on {head.feature_name!r} features, extractor gives "
                             f"{extractor.name!r}")
        self._extractor = extractor
        self._head = head
        self._executor = executor
        self._thresholds = {Role.USER: head.threshold if input_threshold is None else input_threshold,
                            Role.AGENT: head.threshold if output_threshold is None else output_threshold}

    @property
    def head(self) -> Head:
        """The head in use."""
        return self._head

    def score_texts(self, texts: Sequence[str]) -> FloatArray:
        """Blocking: per-text scores, as the input stage reads them (`Head.for_role` gives an output stage's).

        Args:
            texts: the texts.

        Returns:
            (len(texts), 1 + n_categories) scores, each the max over the text's windows.
        """
        if not texts:
            return np.zeros((0, 1 + len(self._head.categories)), dtype=np.float32)
        return self.score_batch(self._extractor.extract(texts))

    def score_batch(self, batch: FeatureBatch) -> FloatArray:
        """Per-text scores from precomputed features (e.g. hidden states from the generation pass).

        Args:
            batch: features with owners.

        Returns:
            (batch.count, 1 + n_categories) scores.
        """
        return max_per_owner(self._head.scores(batch.vectors), batch.owners, batch.count)

    def verdict(self, scores: FloatArray, role: Role, stage: Stage, latency: float) -> Verdict:
        """Turn per-text scores into one verdict (the worst text decides).

        Args:
            scores: (texts, 1 + n_categories).
            role: whose turns were judged; picks the threshold.
            stage: recorded in the verdict.
            latency: seconds spent so far.

        Returns:
            The verdict.
        """
        if scores.shape[0] == 0:
            return Verdict(safe=True, score=0.0, backend=BACKEND_NAME, stage=stage, latency=latency)
        worst = scores[int(np.argmax(scores[:, 0]))]
        score = float(worst[0])
        if score < self._thresholds[role]:
            return Verdict(safe=True, score=score, backend=BACKEND_NAME, stage=stage, latency=latency)
        cats = tuple(sorted(self._head.categories_for(worst[1:]), key=lambda c: (len(c), c)))
        return Verdict(safe=False, categories=cats, score=score, backend=BACKEND_NAME, stage=stage,
                       latency=latency)

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        """Judge the turns of `role` without blocking the event loop.

        Args:
            conversation: all turns.
            role: User (input) or Agent (output).
            stage: input / output / moderate.

        Returns:
            The verdict, backend "classifier".
        """
        started = time.perf_counter()
        texts = texts_to_judge(conversation, role, stage)
        # encoded payloads (base64, leetspeak...) are judged decoded too, off the loop like the encoder
        if isinstance(self._executor, PriorityWorker) and texts and isinstance(self._extractor, WindowedExtractor):
            scores = await self._score_in_slices(self._executor, self._extractor, STAGE_PRIORITY[stage], texts)
        elif isinstance(self._executor, PriorityWorker):
            job = self._executor.submit_at(STAGE_PRIORITY[stage], self._score_judged, texts)
            scores = await asyncio.wrap_future(job)
        else:
            scores = await asyncio.get_running_loop().run_in_executor(self._executor, self._score_judged, texts)
        return self.verdict(self._head.for_role(scores, role, stage), role, stage, time.perf_counter() - started)

    def _score_judged(self, texts: Sequence[str]) -> FloatArray:
        """Blocking: `score_texts` over the texts and their decoded views."""
        return self.score_texts(with_decoded_views(texts))

    async def _score_in_slices(self, worker: PriorityWorker, extractor: WindowedExtractor, priority: int,
                               texts: Sequence[str]) -> FloatArray:
        """`_score_judged` as calls of at most `SLICE_TOKENS` tokens each on `worker` (see `SLICE_TOKENS`)."""

        def first_slice() -> tuple[int, list[list[int]], list[int], FloatArray]:
            judged = with_decoded_views(texts)
            windows, owners = extractor.windows(judged)
            return len(judged), windows, owners, extractor.encode_windows(windows[: slice_end(windows, 0)])

        count, windows, owners, first = await asyncio.wrap_future(worker.submit_at(priority, first_slice))
        # Urgency buys the first slice only (all of a typical prompt): a long text's later slices take turns
        # with the output checks, so a huge input cannot starve the running streams' checks into timeouts.
        later = max(priority, DEFAULT_PRIORITY)
        parts, done = [first], len(first)
        while done < len(windows):
            end = slice_end(windows, done)
            parts.append(await asyncio.wrap_future(worker.submit_at(later, extractor.encode_windows,
                                                                    windows[done:end])))
            done = end
        owner_arr = np.asarray(owners, dtype=np.int64)
        return self.score_batch(FeatureBatch(np.concatenate(parts), owner_arr, count))


def load_metadata(head_path: Path) -> dict[str, object]:
    """The provenance JSON beside a head (same stem, `.json`).

    Args:
        head_path: the .npz path.

    Returns:
        The parsed metadata.
    """
    data: dict[str, object] = json.loads(head_path.with_suffix(".json").read_text())
    return data
