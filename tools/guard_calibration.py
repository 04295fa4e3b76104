"""Out-of-fold calibration scores for a guard head whose encoder was fine-tuned on the training rows.

An adapter that has fitted its training rows gives them overconfident scores, so thresholds cannot be chosen
on those rows' ordinary out-of-fold head scores. `kfold_scores` uses one extra adapter per calibration fold
(`python -m tools.finetune_encoder --fold k --folds n`), each trained without its fold, so every scored row
is unseen by both encoder and head. Used by `python -m tools.train_guard --fold-encoders ...`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from guard.features import FloatArray
from tools.guard_data import Example, fold_of
from tools.train_guard import TrainConfig, featurize, score, train


def kfold_scores(examples: Sequence[Example], fold_encoders: Sequence[Path], cfg: TrainConfig,
                 holdout: Sequence[str] = ()) -> tuple[list[Example], FloatArray]:
    """Out-of-fold scores for the train split when the encoder itself was fine-tuned on it.

    Each fold encoder's adapter (tools/finetune_encoder.py --fold k --folds n; its JSON beside the .npz names
    k and n) left out calibration fold k of the train split; fold k's rows are scored by a head trained, on
    that encoder's features, on the other folds' rows. Neither the encoder nor the head saw a scored row.

    Args:
        examples: all rows.
        fold_encoders: one exported encoder folder per fold, in any order.
        cfg: head hyper-parameters.
        holdout: source specs every fold adapter left out (`finetune_encoder --holdout`, as for the union
            held-out experiment); their rows are neither fitted nor scored.

    Returns:
        (the scored rows, their (n, 15) scores).
    """
    from guard.encoder import MiniLMEncoder
    from tools.guard_report import held_out

    specs = tuple(holdout)
    train_rows = [ex for ex in examples if ex.shippable and ex.split == "train" and not held_out(ex, specs)]
    rows: list[Example] = []
    parts: list[FloatArray] = []
    seen: set[int] = set()
    for folder in fold_encoders:
        manifest = json.loads((folder / "manifest.json").read_text())
        adapter_meta = json.loads(Path(str(manifest["adapter"])).with_suffix(".json").read_text())
        k, n = int(adapter_meta["fold"]), int(adapter_meta["folds"])
        if (n != len(fold_encoders) or k in seen or adapter_meta.get("include_dev")
                or tuple(adapter_meta.get("holdout") or ()) != specs):
            raise ValueError(f"{folder}: adapter fold {k}/{n} does not fit {len(fold_encoders)} fold encoders")
        seen.add(k)
        extractor = MiniLMEncoder(folder, threads=2)
        vecs = featurize(train_rows, extractor)
        fit_idx = [i for i, ex in enumerate(train_rows) if fold_of(ex.hash_key, n) != k]
        test_idx = [i for i, ex in enumerate(train_rows) if fold_of(ex.hash_key, n) == k]
        head = train([train_rows[i] for i in fit_idx], [vecs[i] for i in fit_idx], cfg, extractor.name)
        rows += [train_rows[i] for i in test_idx]
        parts.append(score(head, [vecs[i] for i in test_idx]))
    return rows, np.concatenate(parts)
