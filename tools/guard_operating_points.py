"""The guard's operating points: what each policy threshold (`guard.input_threshold` / `output_threshold`)
would flag, as the Markdown table in docs/GUARD.md.

Usage:
    python -m tools.guard_operating_points --encoder models/minilm-l6-v2-guard --head guard/heads/minilm-l6-v2

Two heads, each scored on rows it never trained on:
- the shipped head (calibrated: its chosen threshold is a score of 0.5) on the measure-only sets, Alpaca
  (ordinary instructions) and MaliciousInstruct (harmful);
- a head trained on the train split (raw scores, as the dev report) on the dev split's permissive rows.
A policy threshold p on the shipped head's scores is the raw threshold r with logit(r) = logit(p) + logit(t0),
t0 the raw threshold chosen at training (`calibrated()` shifted the biases by logit(t0)).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from guard.features import FloatArray
from tools.guard_data import Example
from tools.guard_thresholds import ORDINARY_SOURCES

POLICY_THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1)
HEADER = ("| policy threshold | raw: input / output | Alpaca FPR (shipped head) | MaliciousInstruct recall "
          "(shipped head) | dev: ordinary FPR | dev: worst borderline FPR | dev: harmful-prompt recall | dev: "
          "responses recall / FPR (output) |\n"
          "|---|---|---|---|---|---|---|---|")


def raw_threshold(policy: float, chosen: float) -> float:
    """The raw-score threshold a policy threshold means for a head calibrated at raw threshold `chosen`."""
    logit = math.log(policy / (1 - policy)) + math.log(chosen / (1 - chosen))
    return 1.0 / (1.0 + math.exp(-logit))


def _rate(scores: FloatArray, mask: np.ndarray, threshold: float) -> float:
    return float((scores[mask] >= threshold).mean()) if mask.any() else float("nan")


def table(measure: Sequence[Example], measure_scores: FloatArray, dev: Sequence[Example], dev_scores: FloatArray,
          chosen: float, thresholds: Sequence[float] = POLICY_THRESHOLDS, chosen_output: float | None = None) -> str:
    """The Markdown table.

    Args:
        measure: measure-only rows (Alpaca, MaliciousInstruct).
        measure_scores: (n,) the shipped head's overall scores on them.
        dev: the dev split's permissive rows.
        dev_scores: (m,) the train-split head's raw overall scores on them.
        chosen: the raw input-stage threshold the shipped head was calibrated at.
        thresholds: policy thresholds, one row each.
        chosen_output: the raw output-stage threshold (None: `chosen`); the responses (Agent) column reads it.

    Returns:
        Header and rows.
    """
    def col(rows: Sequence[Example], test: Callable[[Example], bool]) -> np.ndarray:
        return np.array([test(ex) for ex in rows], dtype=bool)

    alpaca = col(measure, lambda ex: ex.source == "alpaca" and not ex.unsafe)
    mal = col(measure, lambda ex: ex.source == "malicious_instruct" and ex.unsafe)
    ordinary = col(dev, lambda ex: ex.source in ORDINARY_SOURCES and not ex.unsafe)
    harmful = col(dev, lambda ex: ex.unsafe and ex.role == "User")
    resp_unsafe = col(dev, lambda ex: ex.source == "responses" and ex.unsafe)
    resp_safe = col(dev, lambda ex: ex.source == "responses" and not ex.unsafe)
    borderline = {s: np.array([ex.source == s and not ex.unsafe and ex.role == "User" for ex in dev], dtype=bool)
                  for s in sorted({ex.source for ex in dev} - ORDINARY_SOURCES)}
    lines = [HEADER]
    for p in thresholds:
        r = raw_threshold(p, chosen)
        r_out = raw_threshold(p, chosen if chosen_output is None else chosen_output)
        worst = max((_rate(dev_scores, m, r), s) for s, m in borderline.items() if m.any())
        bold = "**" if p == 0.5 else ""
        lines.append(f"| {bold}{p:g}{' (default)' if p == 0.5 else ''}{bold} | {r:.3f} / {r_out:.3f} "
                     f"| {_rate(measure_scores, alpaca, p):.3f} | {_rate(measure_scores, mal, p):.3f} "
                     f"| {_rate(dev_scores, ordinary, r):.3f} | {worst[0]:.3f} ({worst[1]}) "
                     f"| {_rate(dev_scores, harmful, r):.3f} "
                     f"| {_rate(dev_scores, resp_unsafe, r_out):.3f} / {_rate(dev_scores, resp_safe, r_out):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: print `table` for an encoder folder and a shipped head."""
    from guard.backends.classifier import load_head
    from guard.encoder import MiniLMEncoder
    from tools.guard_data import add_data_arguments, load_all
    from tools.guard_report import dev_calibration_set, dev_split_scores
    from tools.train_guard import TrainConfig, featurize, score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--head", type=Path, required=True, help="the shipped head, without extension")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    meta = json.loads(args.head.with_suffix(".json").read_text())
    chosen = float(meta["chosen_thresholds_before_calibration"]["overall"])
    chosen_output = meta["chosen_thresholds_before_calibration"].get("output")  # None: one threshold (older heads)
    cfg = TrainConfig(**meta["config"])
    examples = load_all(args.root, args.own)
    extractor = MiniLMEncoder(args.encoder, threads=2)
    if extractor.name != meta["features"]:
        raise SystemExit(f"head features {meta['features']} != encoder {extractor.name}")
    vecs = featurize(examples, extractor)
    shipped = load_head(args.head.with_suffix(".npz"))
    measure = [i for i, ex in enumerate(examples) if not ex.shippable]
    dev, dev_scores = dev_calibration_set(examples, dev_split_scores(examples, vecs, cfg, extractor.name))
    sys.stdout.write(table([examples[i] for i in measure], score(shipped, [vecs[i] for i in measure])[:, 0],
                           dev, dev_scores[:, 0], chosen, chosen_output=chosen_output) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
