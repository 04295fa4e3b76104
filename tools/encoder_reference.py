"""A float64 numpy BERT (HF BertModel semantics) + mean pooling + L2 norm: the reference the exported MiniLM graph
is checked against (`tools/export_encoder.py` before writing, and the tests), written independently of the graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out: np.ndarray = (x - mu) / np.sqrt(var + eps) * w + b
    return out


def numpy_forward(weights: Mapping[str, np.ndarray], config: Mapping[str, object], ids: np.ndarray,
                  mask: np.ndarray) -> np.ndarray:
    """Reference BERT forward + mean pooling + L2 norm in float64 numpy, written from the HF BertModel
    definition independently of the ONNX graph; `export` and the tests compare the graph against it.

    Args:
        weights: HF BertModel tensors.
        config: config.json (num_hidden_layers, num_attention_heads, layer_norm_eps).
        ids: (batch, seq) token ids.
        mask: (batch, seq) 1 for tokens, 0 for padding.

    Returns:
        (batch, hidden) sentence embeddings.
    """
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype != np.int64}
    heads, eps = int(str(config["num_attention_heads"])), float(str(config["layer_norm_eps"]))
    batch, seq = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:seq]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _np_layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    bias = (1.0 - mask[:, None, None, :]) * -1e4  # (batch, 1, 1, seq)
    for i in range(int(str(config["num_hidden_layers"]))):
        p = f"encoder.layer.{i}."

        def lin(t: np.ndarray, name: str, p: str = p) -> np.ndarray:
            return np.asarray(t @ w[p + name + ".weight"].T + w[p + name + ".bias"])

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, seq, heads, -1).transpose(0, 2, 1, 3)  # (batch, heads, seq, head_dim)

        q, k, v = (split(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = _np_layer_norm(lin(ctx, "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], eps)
        inter = lin(x, "intermediate.dense")
        inter = 0.5 * inter * (1.0 + _erf(inter / math.sqrt(2.0)))
        x = _np_layer_norm(lin(inter, "output.dense") + x, w[p + "output.LayerNorm.weight"],
                           w[p + "output.LayerNorm.bias"], eps)
    m = mask[:, :, None].astype(np.float64)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    out: np.ndarray = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return out
