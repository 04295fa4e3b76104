"""A pure-numpy Llama forward pass over dequantized GGUF weights: no onnxruntime, no contrib ops.

Written independently of the converter's graph (HF rotate-half rope on un-permuted Q/K, plain softmax
attention, RMSNorm, SwiGLU) so that it can catch mistakes in the export.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


class NumpyLlama:
    def __init__(self, gguf_path: Path) -> None:
        r = gguf.GGUFReader(str(gguf_path))
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml")}
        self.n_layer = int(f["llama.block_count"])
        self.n_head = int(f["llama.attention.head_count"])
        self.n_kv = int(f["llama.attention.head_count_kv"])
        self.hidden = int(f["llama.embedding_length"])
        self.head_dim = self.hidden // self.n_head
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"])
        self.theta = float(f["llama.rope.freq_base"])
        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            self.w[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        for i in range(self.n_layer):  # undo llama.cpp's interleaved-rope permutation of Q and K rows
            for name, heads in ((f"blk.{i}.attn_q.weight", self.n_head), (f"blk.{i}.attn_k.weight", self.n_kv)):
                w = self.w[name]
                self.w[name] = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    def _norm(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + self.eps) * g).astype(np.float32)

    def _rope(self, x: np.ndarray) -> np.ndarray:
        # x: (heads, seq, head_dim), rotate-half convention
        d = self.head_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d // 2, dtype=np.float64) * 2 / d))
        ang = np.outer(np.arange(x.shape[1]), inv)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(seq, vocab) logits at every position."""
        n, hd = len(ids), self.head_dim
        x = self.w["token_embd.weight"][ids]  # (seq, hidden)
        mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
        for i in range(self.n_layer):
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
        out = self.w.get("output.weight", self.w["token_embd.weight"])
        return x @ out.T
