"""A pure-numpy Llama forward pass over dequantized GGUF weights: no onnxruntime, no contrib ops.

Written independently of the converter's graph (HF rotate-half rope on un-permuted Q/K, plain softmax
attention, RMSNorm, SwiGLU) so that it can catch mistakes in the export. Llama 3 rope scaling follows
llama.cpp: when the GGUF has `rope_freqs.weight`, each rotary angle is divided by its factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Forward:
    """logits: (seq, vocab); hidden: (seq, hidden) each, "i" the input of layer i, "final" after the output norm."""

    logits: np.ndarray
    hidden: dict[str, np.ndarray]


class NumpyLlama:
    """The reference model. `overrides` replaces GGUF-order (permuted Q/K) weights by name, e.g. with what
    a quantizer produced, so a graph can be checked exactly against the weights it was given."""

    def __init__(self, gguf_path: Path, overrides: Mapping[str, np.ndarray] | None = None) -> None:
        r = gguf.GGUFReader(str(gguf_path))
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml")}
        self.n_layer = int(f["llama.block_count"])
        self.n_head = int(f["llama.attention.head_count"])
        self.n_kv = int(f["llama.attention.head_count_kv"])
        self.hidden = int(f["llama.embedding_length"])
        self.head_dim = int(f.get("llama.attention.key_length", self.hidden // self.n_head))
        self.rope_dim = int(f.get("llama.rope.dimension_count", self.head_dim))
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"])
        self.theta = float(f["llama.rope.freq_base"])
        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            self.w[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        for name, value in (overrides or {}).items():
            if self.w[name].shape != value.shape:
                raise ValueError(f"override {name}: shape {value.shape}, GGUF has {self.w[name].shape}")
            self.w[name] = np.asarray(value, np.float32)
        for i in range(self.n_layer):  # undo llama.cpp's interleaved-rope permutation of Q and K rows
            for name, heads in ((f"blk.{i}.attn_q.weight", self.n_head), (f"blk.{i}.attn_k.weight", self.n_kv)):
                w = self.w[name]
                self.w[name] = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        self.factors = self.w.get("rope_freqs.weight")  # (rope_dim/2,) Llama 3 scaling, or None

    def _norm(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        out: np.ndarray = (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + self.eps) * g).astype(np.float32)
        return out

    def _rope(self, x: np.ndarray) -> np.ndarray:
        # x: (heads, seq, head_dim), rotate-half convention over the first rope_dim channels
        d = self.rope_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d // 2, dtype=np.float64) * 2 / d))
        if self.factors is not None:
            inv = inv / self.factors.astype(np.float64).reshape(-1)[: d // 2]
        ang = np.outer(np.arange(x.shape[1]), inv)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        a, b, rest = x[..., : d // 2], x[..., d // 2 : d], x[..., d:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos, rest], axis=-1)

    def forward(self, ids: list[int]) -> Forward:
        """Logits and hidden states at every position of `ids`."""
        n, hd = len(ids), self.head_dim
        x = self.w["token_embd.weight"][ids]  # (seq, hidden)
        mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
        hidden: dict[str, np.ndarray] = {}
        for i in range(self.n_layer):
            hidden[str(i)] = x
            p = f"blk.{i}."
            h = self._norm(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(n, self.n_head, hd).transpose(1, 0, 2)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(n, self.n_kv, hd).transpose(1, 0, 2)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(n, self.n_kv, hd).transpose(1, 0, 2)
            q, k = self._rope(q), self._rope(k)
            rep = self.n_head // self.n_kv
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask  # (heads, seq, seq)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(n, -1)
            x = x + a @ self.w[p + "attn_output.weight"].T
            h = self._norm(x, self.w[p + "ffn_norm.weight"])
            g = h @ self.w[p + "ffn_gate.weight"].T
            u = h @ self.w[p + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ self.w[p + "ffn_down.weight"].T
        x = self._norm(x, self.w["output_norm.weight"])
        hidden["final"] = x
        out = self.w.get("output.weight", self.w["token_embd.weight"])
        return Forward(x @ out.T, hidden)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(seq, vocab) logits at every position."""
        return self.forward(ids).logits
