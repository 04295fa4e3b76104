"""Measure a moderation backend on labelled JSONL: recall, FPR, AUPRC, per-category and per-source figures.

Input rows: {"text", "label": "safe"|"unsafe", optional "role": "User"|"Agent", "categories": ["S1", ...],
"source"}. Each row is judged as a one-turn conversation in its role (Stage.MODERATE).

Usage:
    make guard-eval DATA=file.jsonl
    python -m tools.guard_eval --data file.jsonl [--head guard/heads/minilm-l6-v2.npz]
                               [--encoder models/minilm-l6-v2-guard] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tools.guard_data import read_jsonl

DEFAULT_HEAD = Path("guard/heads/minilm-l6-v2.npz")
DEFAULT_ENCODER = Path("models/minilm-l6-v2-guard")
BoolArray = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float32] | npt.NDArray[np.float64]


def average_precision(labels: BoolArray, scores: Floats) -> float:
    """Area under the precision-recall curve as average precision (sklearn's definition: step-wise, no
    interpolation; ties broken by treating tied scores as one threshold).

    Args:
        labels: (n,) True for positives.
        scores: (n,) higher = more positive.

    Returns:
        AP in [0, 1]; nan without positives.
    """
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    # last index of each run of tied scores: a threshold takes all tied rows at once
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp_at, n_at = tp[last], last + 1
    precision = tp_at / n_at
    recall_step = np.diff(np.r_[0, tp_at]) / n_pos
    return float(np.sum(precision * recall_step))


def auroc(labels: BoolArray, scores: Floats) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half).

    Args:
        labels: (n,) True for positives.
        scores: (n,) scores.

    Returns:
        AUROC; nan when a class is missing.
    """
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(sorted_scores[np.r_[False, np.diff(sorted_scores) == 0]]):
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Figures:
    """Binary figures at one threshold. Rates are nan when their class is absent."""

    n_unsafe: int
    n_safe: int
    recall: float
    fpr: float
    auprc: float
    auroc: float


def binary_figures(labels: BoolArray, scores: Floats, threshold: float) -> Figures:
    """Recall, FPR, AUPRC and AUROC of `scores` against `labels`.

    Args:
        labels: (n,) True for unsafe.
        scores: (n,) unsafe scores.
        threshold: flag when score >= threshold.

    Returns:
        The figures.
    """
    flagged = scores >= threshold
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    recall = float(flagged[labels].mean()) if n_pos else float("nan")
    fpr = float(flagged[~labels].mean()) if n_neg else float("nan")
    return Figures(n_pos, n_neg, recall, fpr, average_precision(labels, scores), auroc(labels, scores))


def category_table(true_cats: Sequence[Sequence[str]], pred_cats: Sequence[Sequence[str]],
                   codes: Sequence[str]) -> list[tuple[str, int, float, float]]:
    """Per-category support, recall and precision of predicted category codes.

    Args:
        true_cats: labelled codes per row (empty for safe or uncategorised rows).
        pred_cats: predicted codes per row (empty when judged safe).
        codes: the codes to report.

    Returns:
        Rows (code, support, recall, precision); nan where undefined.
    """
    out = []
    for code in codes:
        truth = np.array([code in c for c in true_cats])
        pred = np.array([code in c for c in pred_cats])
        support = int(truth.sum())
        recall = float((truth & pred).sum() / support) if support else float("nan")
        precision = float((truth & pred).sum() / pred.sum()) if pred.sum() else float("nan")
        out.append((code, support, recall, precision))
    return out


def format_figures(name: str, f: Figures) -> str:
    """One Markdown table row: name | unsafe | safe | recall | FPR | AUPRC | AUROC."""
    def num(x: float) -> str:
        return "-" if np.isnan(x) else f"{x:.3f}"
    return (f"| {name} | {f.n_unsafe} | {f.n_safe} | {num(f.recall)} | {num(f.fpr)} | {num(f.auprc)} "
            f"| {num(f.auroc)} |")


TABLE_HEADER = "| set | unsafe | safe | recall | FPR | AUPRC | AUROC |\n|---|---|---|---|---|---|---|"


def _judge(rows: list[dict[str, object]], head_path: Path, encoder_dir: Path) -> tuple[list[float], list[tuple[
        str, ...]], float]:
    """Run the classifier backend on every row through its public `moderate` method."""
    from guard.backends.classifier import ClassifierModerator, load_head
    from guard.encoder import MiniLMEncoder
    from guard.moderator import Message, Role, Stage

    moderator = ClassifierModerator(MiniLMEncoder(encoder_dir, threads=2), load_head(head_path))

    async def run() -> tuple[list[float], list[tuple[str, ...]], float]:
        scores, cats = [], []
        started = time.perf_counter()
        for row in rows:
            role = Role.AGENT if row.get("role") == "Agent" else Role.USER
            msg = Message("assistant" if role is Role.AGENT else "user", str(row["text"]))
            verdict = await moderator.moderate([msg], role, Stage.MODERATE)
            scores.append(verdict.score)
            cats.append(verdict.categories)
        return scores, cats, (time.perf_counter() - started) / max(1, len(rows))

    return asyncio.run(run())


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def report(rows: list[dict[str, object]], scores: Floats, pred_cats: Sequence[Sequence[str]],
           threshold: float, codes: Sequence[str]) -> str:
    """The Markdown report: overall, per source, per role, per category.

    Args:
        rows: the labelled rows.
        scores: (n,) unsafe scores.
        pred_cats: predicted categories per row.
        threshold: the overall threshold in force.
        codes: category codes to report.

    Returns:
        Markdown text.
    """
    labels = np.array([r["label"] == "unsafe" for r in rows])
    lines = [f"threshold {threshold:.3f}", "", TABLE_HEADER, format_figures("all", binary_figures(labels, scores,
                                                                                                   threshold))]
    for key in ("role", "source"):
        values = sorted({str(r.get(key, "")) for r in rows})
        if len(values) > 1:
            for value in values:
                mask = np.array([str(r.get(key, "")) == value for r in rows])
                lines.append(format_figures(f"{key}={value}", binary_figures(labels[mask], scores[mask], threshold)))
    # unsafe rows without labelled categories say nothing about categories: left out of this table
    keep = [i for i, r in enumerate(rows) if r["label"] == "safe" or _as_list(r.get("categories"))]
    true_cats = [[str(c) for c in _as_list(rows[i].get("categories"))] for i in keep]
    lines += ["", "| category | support | recall | precision |", "|---|---|---|---|"]
    for code, support, rec, prec in category_table(true_cats, [pred_cats[i] for i in keep], codes):
        if support or not np.isnan(prec):
            lines.append(f"| {code} | {support} | {rec:.3f} | {prec:.3f} |".replace("nan", "-"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point.

    Args:
        argv: command-line arguments.

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--encoder", type=Path, default=DEFAULT_ENCODER)
    args = parser.parse_args(argv)
    rows = read_jsonl(args.data)
    bad = [i for i, r in enumerate(rows) if r.get("label") not in ("safe", "unsafe") or "text" not in r]
    if bad:
        sys.stderr.write(f"rows {bad[:5]} lack text or a label of safe/unsafe\n")
        return 2
    from guard.backends.classifier import load_head

    head = load_head(args.head)
    scores, cats, per_text = _judge(rows, args.head, args.encoder)
    sys.stdout.write(f"backend classifier, head {args.head}, {len(rows)} rows, {per_text * 1000:.1f} ms/text\n")
    sys.stdout.write(report(rows, np.asarray(scores), cats, head.threshold, head.categories) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
