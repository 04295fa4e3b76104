"""Train the embedded guard head: labelled data -> features -> head (.npz) + provenance (.json).

One command retrains the shipped head (needs `make encoder` and ../shared/data/guard); `make guard-train`
first re-fits the encoder's adapter (tools/finetune_encoder.py, needs torch) and re-exports the encoder:
    python -m tools.train_guard --encoder models/minilm-l6-v2-guard --out guard/heads/minilm-l6-v2
Measure without writing a head (dev split and held-out sources, Markdown for docs/GUARD.md):
    python -m tools.train_guard --report

Only rows with a permissive licence train (`Example.shippable`); Alpaca and MaliciousInstruct only measure.
Training is numpy: full-batch Adam on weighted binary cross-entropy for the overall column and the
S1..S14 columns together. Features are cached in build/guard/ by text hash, so reruns are quick.
For another feature source (e.g. the served model's hidden states), pass its extractor to `featurize`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from guard.backends.classifier import Head, save_head
from guard.features import FeatureExtractor, FloatArray
from tools.guard_data import Example, add_data_arguments, fold_of, load_all
from tools.guard_thresholds import calibrated, choose_thresholds, logit, threshold_rule_conflict

LOG = logging.getLogger("train_guard")
CODES = tuple(f"S{i}" for i in range(1, 15))
CACHE_DIR = Path("build/guard")
EXTRACT_CHUNK = 256  # texts per extractor call: bounds memory, lets the cache be saved as it grows


@dataclass(frozen=True)
class TrainConfig:
    """Head hyper-parameters (chosen on the dev split; see docs/GUARD.md)."""

    hidden: int = 128  # 0 = logistic regression; > 0 = one ReLU layer of this width
    l2: float = 1e-2  # strong: weaker decay fits source style and transfers worse to unseen sets
    epochs: int = 300
    lr: float = 0.01
    category_weight: float = 0.5  # weight of the S1..S14 losses relative to the overall loss
    group_power: float = 0.5  # a (source, label) group of n rows weighs n**power in total
    seed: int = 0


def featurize(examples: Sequence[Example], extractor: FeatureExtractor, cache_dir: Path = CACHE_DIR
              ) -> list[FloatArray]:
    """Feature rows (one per window) for each example, cached by text hash.

    Args:
        examples: the rows.
        extractor: the feature source.
        cache_dir: where `<feature name>.npz` caches live.

    Returns:
        Per example a (windows, dim) array.
    """
    cache_path = cache_dir / (extractor.name.replace("/", "_") + ".npz")
    cache: dict[str, FloatArray] = {}
    if cache_path.exists():
        with np.load(cache_path, allow_pickle=False) as z:
            keys, offsets, vectors = z["keys"], z["offsets"], z["vectors"]
            cache = {str(k): vectors[offsets[i] : offsets[i + 1]] for i, k in enumerate(keys)}
    keyed = [hashlib.sha1(ex.text.encode()).hexdigest() for ex in examples]
    # by length, so each encoder batch pads little
    missing = sorted({k: ex.text for k, ex in zip(keyed, examples, strict=True) if k not in cache}.items(),
                     key=lambda kv: len(kv[1]))
    for lo in range(0, len(missing), EXTRACT_CHUNK):
        chunk = missing[lo : lo + EXTRACT_CHUNK]
        batch = extractor.extract([t for _, t in chunk])
        for i, (key, _) in enumerate(chunk):
            cache[key] = batch.vectors[batch.owners == i]
        LOG.info("featurised %d/%d new texts", min(lo + EXTRACT_CHUNK, len(missing)), len(missing))
        if (lo // EXTRACT_CHUNK) % 8 == 7 or lo + EXTRACT_CHUNK >= len(missing):
            _save_cache(cache, cache_path)
    return [cache[k] for k in keyed]


def _save_cache(cache: dict[str, FloatArray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys_sorted = sorted(cache)
    sizes = np.array([len(cache[k]) for k in keys_sorted])
    np.savez(path, keys=np.array(keys_sorted), offsets=np.r_[0, np.cumsum(sizes)],
             vectors=np.concatenate([cache[k] for k in keys_sorted]))


def targets(examples: Sequence[Example]) -> tuple[FloatArray, FloatArray]:
    """(n,) overall labels and (n, 14) category labels."""
    y = np.array([ex.unsafe for ex in examples], dtype=np.float32)
    cats = np.array([[code in ex.categories for code in CODES] for ex in examples], dtype=np.float32)
    return y, cats


def sample_weights(examples: Sequence[Example], power: float) -> FloatArray:
    """Weights that damp big sources and balance unsafe against safe in total.

    Args:
        examples: the training rows.
        power: a (source, label) group of n rows gets total weight n**power.

    Returns:
        (n,) weights with mean 1.
    """
    groups: dict[tuple[str, bool], int] = {}
    for ex in examples:
        groups[(ex.source, ex.unsafe)] = groups.get((ex.source, ex.unsafe), 0) + 1
    w = np.array([groups[(ex.source, ex.unsafe)] ** (power - 1.0) for ex in examples])
    unsafe = np.array([ex.unsafe for ex in examples])
    if unsafe.any() and (~unsafe).any():
        w[unsafe] *= w[~unsafe].sum() / w[unsafe].sum()
    out: FloatArray = (w / w.mean()).astype(np.float32)
    return out


def _sigmoid(x: FloatArray) -> FloatArray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))).astype(np.float32)


def fit(x: FloatArray, y: FloatArray, cats: FloatArray, w: FloatArray, cfg: TrainConfig, feature_name: str
        ) -> Head:
    """Fit a head by full-batch Adam on weighted BCE + L2 (thresholds left at 0.5).

    Args:
        x: (n, dim) features.
        y: (n,) overall labels.
        cats: (n, 14) category labels.
        w: (n,) sample weights.
        cfg: hyper-parameters.
        feature_name: recorded in the head.

    Returns:
        The trained head.
    """
    rng = np.random.default_rng(cfg.seed)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = ((x - mean) / scale).astype(np.float32)
    t = np.c_[y, cats].astype(np.float32)  # (n, 15)
    col_w = np.r_[1.0, np.full(len(CODES), cfg.category_weight)].astype(np.float32)
    dim, width = z.shape[1], cfg.hidden or z.shape[1]
    params = {"out_w": rng.normal(0, 0.01, (width, t.shape[1])).astype(np.float32),
              "out_b": np.zeros(t.shape[1], np.float32)}
    if cfg.hidden:
        params["hidden_w"] = rng.normal(0, np.sqrt(2.0 / dim), (dim, cfg.hidden)).astype(np.float32)
        params["hidden_b"] = np.zeros(cfg.hidden, np.float32)
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    wn = (w / w.sum())[:, None] * col_w[None, :]  # (n, 15) per-cell loss weights
    for step in range(1, cfg.epochs + 1):
        h = np.maximum(z @ params["hidden_w"] + params["hidden_b"], 0.0) if cfg.hidden else z
        d_logits = (_sigmoid(h @ params["out_w"] + params["out_b"]) - t) * wn  # dBCE/dlogit
        grads = {"out_w": h.T @ d_logits + 2 * cfg.l2 * params["out_w"], "out_b": d_logits.sum(0)}
        if cfg.hidden:
            d_h = (d_logits @ params["out_w"].T) * (h > 0)
            grads["hidden_w"] = z.T @ d_h + 2 * cfg.l2 * params["hidden_w"]
            grads["hidden_b"] = d_h.sum(0)
        for k, g in grads.items():
            m, v = moments[k]
            m[:] = 0.9 * m + 0.1 * g
            v[:] = 0.999 * v + 0.001 * g * g
            params[k] -= cfg.lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return Head(feature_name, CODES, mean.astype(np.float32), scale.astype(np.float32),
                params.get("hidden_w"), params.get("hidden_b"), params["out_w"], params["out_b"], 0.5,
                np.full(len(CODES), 0.5, np.float32))


def first_windows(vecs: Sequence[FloatArray]) -> FloatArray:
    """Training rows: a text's first window (later windows of a long text may not carry its label)."""
    return np.stack([v[0] for v in vecs]).astype(np.float32)


def score(head: Head, vecs: Sequence[FloatArray]) -> FloatArray:
    """Per-text scores as served: the max over the text's windows.

    Args:
        head: the head.
        vecs: per text a (windows, dim) array.

    Returns:
        (n, 15) scores.
    """
    flat = np.concatenate(vecs)
    owners = np.repeat(np.arange(len(vecs)), [len(v) for v in vecs])
    out = np.full((len(vecs), 1 + len(head.categories)), -np.inf, dtype=np.float32)
    np.maximum.at(out, owners, head.scores(flat))
    return out


def train(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig, feature_name: str) -> Head:
    """Fit a head on examples (all of them: callers filter by split / licence).

    Args:
        examples: training rows.
        vecs: their features.
        cfg: hyper-parameters.
        feature_name: recorded in the head.

    Returns:
        The head with thresholds 0.5.
    """
    y, cats = targets(examples)
    return fit(first_windows(vecs), y, cats, sample_weights(examples, cfg.group_power), cfg, feature_name)


def oof_scores(examples: Sequence[Example], vecs: Sequence[FloatArray], cfg: TrainConfig, feature_name: str,
               folds: int = 5) -> FloatArray:
    """Out-of-fold scores: each row scored by a head that did not see it (folds by text hash).

    Args:
        examples: rows.
        vecs: their features.
        cfg: hyper-parameters.
        feature_name: feature space id.
        folds: number of folds.

    Returns:
        (n, 15) scores.
    """
    fold = np.array([fold_of(ex.hash_key, folds, byte=1) for ex in examples])
    out = np.zeros((len(examples), 1 + len(CODES)), dtype=np.float32)
    for k in range(folds):
        tr, te = np.nonzero(fold != k)[0].tolist(), np.nonzero(fold == k)[0].tolist()
        head = train([examples[i] for i in tr], [vecs[i] for i in tr], cfg, feature_name)
        out[te] = score(head, [vecs[i] for i in te])
    return out


def choose_category_thresholds(examples: Sequence[Example], cat_scores: FloatArray) -> FloatArray:
    """Per category, the threshold with the best F1 among unsafe rows (0.5 with fewer than 10 positives).

    Args:
        examples: rows.
        cat_scores: (n, 14) out-of-fold category scores.

    Returns:
        (14,) thresholds.
    """
    unsafe = np.array([ex.unsafe for ex in examples])
    _, cats = targets(examples)
    out = np.full(len(CODES), 0.5, dtype=np.float32)
    for j in range(len(CODES)):
        truth = cats[unsafe, j] > 0
        if truth.sum() < 10:
            continue
        best = (-1.0, 0.5)
        for t in np.linspace(0.05, 0.95, 91):
            pred = cat_scores[unsafe, j] >= t
            tp = float((pred & truth).sum())
            f1 = 2 * tp / max(1.0, float(pred.sum() + truth.sum()))
            best = max(best, (f1, float(t)))
        out[j] = best[1]
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point.

    Args:
        argv: command-line arguments.

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--encoder", type=Path, default=Path("models/minilm-l6-v2-guard"))
    parser.add_argument("--out", type=Path, default=Path("guard/heads/minilm-l6-v2"), help="path stem")
    parser.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    parser.add_argument("--l2", type=float, default=TrainConfig.l2)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="head initialisation seed")
    parser.add_argument("--ordinary-fpr", type=float, default=0.045, help="threshold budget: ordinary instructions")
    parser.add_argument("--borderline-fpr", type=float, default=0.3, help="threshold budget: each borderline set")
    parser.add_argument("--stage-thresholds", action="store_true",
                        help="one threshold per stage (User rows / Agent rows) instead of one for both; measured, "
                             "not shipped (docs/GUARD.md)")
    parser.add_argument("--input-borderline-fpr", type=float, default=None,
                        help="input threshold: the lower of the shipped rule's and the rule on User rows with this "
                             "borderline budget (the target less a margin); output threshold the shipped rule's")
    parser.add_argument("--calibrate", choices=("oof", "dev"), default=None,
                        help="thresholds from out-of-fold train scores or the dev split (default: dev when the "
                             "encoder carries a fine-tuning adapter, else oof)")
    parser.add_argument("--fold-encoders", type=Path, nargs="*", default=[],
                        help="with --calibrate dev: encoders whose adapters each left out one calibration fold of "
                             "the train split; their out-of-fold scores join the dev split's for the thresholds")
    parser.add_argument("--stream-tokenizer", type=Path, default=None,
                        help="the served model's tokenizer.json: also choose the per-stream output threshold "
                             "(tools/guard_stream_threshold.py; the head carries it as stream_offset)")
    parser.add_argument("--report", action="store_true", help="print the dev report only; write nothing")
    args = parser.parse_args(argv)
    conflict = threshold_rule_conflict(args.stage_thresholds, args.input_borderline_fpr)
    if conflict:
        parser.error(conflict)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from guard.encoder import MiniLMEncoder
    from tools import guard_calibration, guard_report

    cfg = TrainConfig(hidden=args.hidden, l2=args.l2, epochs=args.epochs, seed=args.seed)
    extractor = MiniLMEncoder(args.encoder, threads=2)
    manifest = json.loads((args.encoder / "manifest.json").read_text())
    # an encoder fine-tuned on the train split has memorised it: out-of-fold scores there are overconfident,
    # so thresholds come from the dev split it never saw, and held-out-source heads would be contaminated
    adapted = manifest.get("adapter_sha256") is not None
    calibrate = args.calibrate or ("dev" if adapted else "oof")
    examples = load_all(args.root, args.own)
    vecs = featurize(examples, extractor)
    keep = [i for i, ex in enumerate(examples) if ex.shippable]
    ship = [examples[i] for i in keep]
    ship_vecs = [vecs[i] for i in keep]
    threshold: tuple[float, float] | None = None  # (input, output)
    dev = None
    # the head the dev split is scored with is also the one the per-stream threshold replays answers with
    split_head = (guard_report.train_split_head(examples, vecs, cfg, extractor.name)
                  if calibrate == "dev" or args.stream_tokenizer is not None else None)
    if split_head is not None:
        dev = guard_report.dev_split_scores(examples, vecs, cfg, extractor.name, head=split_head)
    if calibrate == "dev" and dev is not None:
        cal, cal_scores = guard_report.dev_calibration_set(examples, dev)
        if args.fold_encoders:  # plus out-of-fold scores for the train split: ~5x the calibration rows
            rows, scores = guard_calibration.kfold_scores(examples, args.fold_encoders, cfg)
            cal, cal_scores = cal + rows, np.concatenate([cal_scores, scores])
            calibrate = "dev+kfold"
        threshold = choose_thresholds(cal, cal_scores[:, 0], args.ordinary_fpr, args.borderline_fpr,
                                      args.stage_thresholds, args.input_borderline_fpr)
    report, _ = guard_report.dev_report(examples, vecs, cfg, extractor.name, args.ordinary_fpr,
                                        args.borderline_fpr, calibrate=calibrate, held_out_sources=not adapted,
                                        threshold=threshold, dev=dev, per_stage=args.stage_thresholds)
    sys.stdout.write(report + "\n")
    if args.report:
        return 0
    if threshold is None:
        cal, cal_scores = ship, oof_scores(ship, ship_vecs, cfg, extractor.name)
        threshold = choose_thresholds(cal, cal_scores[:, 0], args.ordinary_fpr, args.borderline_fpr,
                                      args.stage_thresholds, args.input_borderline_fpr)
    t_in, t_out = threshold
    cat_thresholds = choose_category_thresholds(cal, cal_scores[:, 1:])
    head = calibrated(train(ship, ship_vecs, cfg, extractor.name), t_in, cat_thresholds, output_threshold=t_out)
    stream = None
    if args.stream_tokenizer is not None and split_head is not None:
        from tools import guard_stream_threshold

        safe_answers = [ex.text for ex in examples
                        if ex.split == "dev" and ex.shippable and ex.role == "Agent" and not ex.unsafe]
        stream = guard_stream_threshold.stream_threshold(split_head, extractor, safe_answers, args.stream_tokenizer,
                                                         t_out)
        head = replace(head, stream_offset=logit(stream.threshold) - logit(t_out))
    save_head(head, args.out.with_suffix(".npz"))
    meta = guard_report.build_metadata(ship, head, cfg, report)
    if stream is not None:
        meta["stream_output_threshold"] = stream.as_metadata(str(args.stream_tokenizer))
    meta["encoder_manifest"] = {k: manifest.get(k) for k in ("source", "adapter", "adapter_sha256", "weights",
                                                        "feature_name")}
    meta["threshold_calibration"] = calibrate
    meta["chosen_thresholds_before_calibration"] = {
        "overall": t_in, "output": t_out, **({"output_stream": stream.threshold} if stream else {}),
        **dict(zip(CODES, map(float, cat_thresholds), strict=True))}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    LOG.info("wrote %s.npz / .json", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
