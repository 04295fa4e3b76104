"""Option (a) of the guard issue, measured: a head on the served model's own hidden states vs MiniLM.

Featurises every guard example with the served decoder (the text as the turn of its role inside the chat
template, as the engine would see it; the last position and the mean over the text's own tokens, at
chosen layers), then compares feature sets by held-out-source generalisation: for each source, a head is
trained on every permissive row except that source and tested on it, the threshold set so that Alpaca
(never trained on) has FPR 0.04.

    python -m tools.add_hidden_outputs models/smollm2-135m-instruct-int4 --layers 14,22 --out build/hs-model
    python -m tools.hidden_probe featurize --model build/hs-model --layers 14,22   # ~45 min on 2 cores
    python -m tools.hidden_probe compare minilm hs22 minilm+hs22 hs14_22

`hsL` = layer L, last + mean (2 x hidden); `hsLlast`, `hsLmean` one of them; `a+b` concatenates. The
results are in docs/GUARD.md ("Why (b)"). Build-time only: nothing here is served.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from guard.features import FloatArray
from tools import train_guard as tg
from tools.guard_data import Example, load_all

LOG = logging.getLogger("hidden_probe")
CACHE = Path("build/guard/hidden_states.npz")
HOLDOUTS = ("harmbench", "strongreject", "do_not_answer", "responses", "hatecheck", "toxigen",
            "wildguard_benign", "coconot_contrast", "own_borderline_safe", "notinject", "coconot_pref")
MAX_TOKENS = 160  # of the text itself: the probe reads its head, as a prefill would


def example_key(ex: Example) -> str:
    return hashlib.sha1((ex.role + "\0" + ex.text).encode()).hexdigest()


def _prompt_parts(tok: Tokenizer, template: str, role: str) -> tuple[list[int], list[int]]:
    """Token ids before and after a turn's content, from the folder's Jinja chat template."""
    from jinja2 import Environment  # build-time only

    marker = "\x00CONTENT\x00"
    text = Environment().from_string(template).render(messages=[{"role": role, "content": marker}],
                                                      add_generation_prompt=False)
    before, after = text.split(marker)
    return tok.encode(before, add_special_tokens=False).ids, tok.encode(after, add_special_tokens=False).ids


def _featurize_shard(args: tuple[Path, list[int], list[tuple[str, str, str]], int]) -> tuple[list[str], FloatArray]:
    model, layers, rows, shard = args
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    template = json.loads((model / "tokenizer_config.json").read_text())["chat_template"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    past = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    outputs = [f"hidden_states.{layer}" for layer in layers]
    parts = {r: _prompt_parts(tok, template, r) for r in ("user", "assistant")}
    feats = []
    for i, (_, role, text) in enumerate(rows):
        before, after = parts["user" if role == "User" else "assistant"]
        body = tok.encode(text, add_special_tokens=False).ids[:MAX_TOKENS] or after[:1]
        ids = np.array([before + body + after], np.int64)
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for name, shape in past.items():
            feed[name] = np.zeros((1, shape[1], 0, shape[3]), np.float32)
        hidden = sess.run(outputs, feed)
        lo, hi = len(before), len(before) + len(body)
        feats.append(np.stack([np.stack([h[0, -1], h[0, lo:hi].mean(0)]) for h in hidden]))
        if i % 500 == 0:
            LOG.info("shard %d: %d/%d", shard, i, len(rows))
    return [k for k, _, _ in rows], np.stack(feats).astype(np.float16)


def featurize(model: Path, layers: list[int], workers: int) -> None:
    """Computes (layers, 2, hidden) features for every example missing from the cache."""
    cached: dict[str, np.ndarray] = {}
    if CACHE.exists():
        with np.load(CACHE) as z:
            cached = {k: z[k] for k in z.files}
    if cached and list(cached["layers"]) != layers:
        raise SystemExit(f"{CACHE} holds layers {list(cached['layers'])}; remove it to change layers")
    have = set(map(str, cached.get("keys", [])))
    rows = sorted({example_key(e): (example_key(e), e.role, e.text) for e in load_all()
                   if example_key(e) not in have}.values())
    LOG.info("%d texts to featurise with %s", len(rows), model)
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(_featurize_shard, [(model, layers, rows[s::workers], s) for s in range(workers)])
    keys = list(map(str, cached.get("keys", []))) + [k for ks, _ in results for k in ks]
    feats = [cached["feats"]] if "feats" in cached else []
    feats += [f for _, f in results if len(f)]
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, keys=np.array(keys), feats=np.concatenate(feats), layers=np.array(layers))


def feature_matrix(spec: str, examples: list[Example]) -> tuple[FloatArray, np.ndarray]:
    """(n, dim) features for a spec like "minilm+hs22", and the mask of examples that have them."""
    from guard.encoder import MiniLMEncoder

    parts, mask = [], np.ones(len(examples), bool)
    for part in spec.split("+"):
        if part == "minilm":
            vecs = tg.featurize(examples, MiniLMEncoder(Path("models/minilm-l6-v2"), threads=2))
            parts.append(tg.first_windows(vecs))
            continue
        with np.load(CACHE) as z:
            keys, feats, layers = z["keys"], z["feats"], list(z["layers"])
        index = {str(k): i for i, k in enumerate(keys)}
        kinds = (0,) if part.endswith("last") else (1,) if part.endswith("mean") else (0, 1)
        wanted = [int(x) for x in part[2:].removesuffix("last").removesuffix("mean").split("_")]
        rows = [index.get(example_key(e), -1) for e in examples]
        mask &= np.array(rows) >= 0
        x = np.stack([np.concatenate([feats[r, layers.index(layer), k] for layer in wanted for k in kinds])
                      if r >= 0 else np.zeros(len(wanted) * len(kinds) * feats.shape[-1])
                      for r in rows]).astype(np.float32)
        parts.append(x / (np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(x.shape[1]) + 1e-6))
    return np.concatenate(parts, 1).astype(np.float32), mask


def compare(spec: str, examples: list[Example], mask: np.ndarray, cfg: tg.TrainConfig) -> list[str]:
    """Markdown rows: per held-out source, recall / FPR at Alpaca FPR 0.04, and MaliciousInstruct recall."""
    x, have = feature_matrix(spec, examples)
    mask = mask & have
    src = np.array([e.source for e in examples])
    y = np.array([e.unsafe for e in examples])
    ship = np.array([e.shippable for e in examples]) & mask
    out = []
    for held in HOLDOUTS:
        train_rows = np.nonzero(ship & (src != held))[0]
        test = (src == held) & mask
        sub = [examples[i] for i in train_rows]
        yy, cats = tg.targets(sub)
        head = tg.fit(x[train_rows], yy, cats, tg.sample_weights(sub, cfg.group_power), cfg, spec)
        s = head.scores(x)[:, 0]
        t = float(np.quantile(s[(src == "alpaca") & mask], 0.96))
        rec = f"{(s[test & y] >= t).mean():.3f}" if (test & y).any() else "-"
        fpr = f"{(s[test & ~y] >= t).mean():.3f}" if (test & ~y).any() else "-"
        out.append(f"| {spec} | {held} | {rec} | {fpr} | {(s[(src == 'malicious_instruct') & mask] >= t).mean():.3f} |")
        LOG.info(out[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("featurize")
    f.add_argument("--model", type=Path, required=True, help="decoder folder with hidden_states.<L> outputs")
    f.add_argument("--layers", default="14,22")
    f.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("specs", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "featurize":
        featurize(args.model, [int(x) for x in args.layers.split(",")], args.workers)
        return 0
    examples = load_all()
    mask = np.ones(len(examples), bool)  # compare every spec on the rows that have hidden-state features
    if any(part != "minilm" for spec in args.specs for part in spec.split("+")):
        with np.load(CACHE) as z:
            cached = set(map(str, z["keys"]))
        mask = np.array([example_key(e) in cached for e in examples])
    print("| features | held out | recall | FPR | MaliciousInstruct recall |\n|---|---|---|---|---|")
    for spec in args.specs:
        print("\n".join(compare(spec, examples, mask, tg.TrainConfig())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
