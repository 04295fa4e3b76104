"""Dev report for the guard head: the dev split and held-out-source experiments, as Markdown.

Used by `python -m tools.train_guard` (printed, and stored in the head's JSON under `dev_report`). Every
head here is trained without the rows it is tested on: the dev split's head on the train split, each
"without X" head on every permissive row except source X.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from guard.features import FloatArray
from tools.guard_data import Example
from tools.train_guard import TrainConfig, choose_threshold, oof_scores, score, train

# Held-out-source experiments: train without the named sources, test on them (plus the measure-only sets).
HOLDOUTS: dict[str, tuple[str, ...]] = {
    "wildguard_benign": ("wildguard_benign",),
    "coconot (contrast + pref + eval)": ("coconot_contrast", "coconot_pref", "coconot_eval"),
    "notinject": ("notinject",),
    "own borderline_safe": ("own_borderline_safe",),
    "hatecheck": ("hatecheck",),
    "toxigen": ("toxigen",),
    "strongreject": ("strongreject",),
    "harmbench": ("harmbench",),
    "do_not_answer": ("do_not_answer",),
    "responses": ("responses",),
    # moderation-style proxy: our own statements (posts, not requests), unsafe and safe, held out together
    "own statements": ("own_harmful_round2:statement-", "own_safe_round2:statement-"),
}


def held_out(ex: Example, specs: tuple[str, ...]) -> bool:
    """Whether `ex` belongs to a held-out group: a spec is a source, or "source:group-prefix"."""
    for spec in specs:
        source, _, prefix = spec.partition(":")
        if ex.source == source and ex.group.startswith(prefix):
            return True
    return False


def _figures_rows(name: str, examples: Sequence[Example], scores: FloatArray, threshold: float) -> list[str]:
    from tools.guard_eval import binary_figures, format_figures

    labels = np.array([ex.unsafe for ex in examples])
    rows = [format_figures(name, binary_figures(labels, scores[:, 0], threshold))]
    for src in sorted({ex.source for ex in examples}):
        m = np.array([ex.source == src for ex in examples])
        rows.append(format_figures(f"  {src}", binary_figures(labels[m], scores[m, 0], threshold)))
    return rows


def dev_report(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig, feature_name: str,
               ordinary_fpr: float, borderline_fpr: float) -> tuple[str, float]:
    """Markdown: in-distribution dev split, then one block per held-out source group.

    Args:
        examples: all rows (train and dev, shippable and measure-only).
        vecs: their features.
        cfg: hyper-parameters.
        feature_name: feature space id.
        ordinary_fpr: threshold budget on ordinary instructions (out-of-fold train scores).
        borderline_fpr: threshold budget on each borderline safe source.

    Returns:
        (markdown, threshold used).
    """
    from tools.guard_eval import TABLE_HEADER

    tr = [i for i, ex in enumerate(examples) if ex.split == "train" and ex.shippable]
    dv = [i for i, ex in enumerate(examples) if ex.split == "dev"]
    sub = [examples[i] for i in tr]
    oof = oof_scores(sub, [vecs[i] for i in tr], cfg, feature_name)
    threshold = choose_threshold(sub, oof[:, 0], ordinary_fpr, borderline_fpr)
    head = train(sub, [vecs[i] for i in tr], cfg, feature_name)
    lines = [f"config {asdict(cfg)}, threshold {threshold:.3f} (out-of-fold on train)", "",
             "### dev split (20% of every training source by text hash; alpaca + malicious_instruct never "
             "trained)", "", TABLE_HEADER]
    lines += _figures_rows("dev", [examples[i] for i in dv], score(head, [vecs[i] for i in dv]), threshold)
    measure = [i for i, ex in enumerate(examples) if not ex.shippable]
    lines += ["", "### held-out sources (trained without them; same threshold)", "", TABLE_HEADER]
    for name, sources in HOLDOUTS.items():
        keep = [i for i, ex in enumerate(examples) if ex.shippable and not held_out(ex, sources)]
        test = [i for i, ex in enumerate(examples) if held_out(ex, sources)]
        head = train([examples[i] for i in keep], [vecs[i] for i in keep], cfg, feature_name)
        s = score(head, [vecs[i] for i in test + measure])
        ex_test = [examples[i] for i in test + measure]
        lines += _figures_rows(f"without {name}", ex_test, s, threshold)
    return "\n".join(lines), threshold
