"""Reads a `general.architecture = llama` GGUF: hyper-parameters from metadata, weights per tensor.

Nothing about a particular model is hard-coded: sizes, heads, rope base and scaling, eps and context
length all come from the GGUF's metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tools import quant
from tools.quant import QuantLinear

# Tensor types the converter reads; anything else is refused with a clear message.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
EXACT_LOADERS = {"Q4_0": quant.from_q4_0, "Q4_1": quant.from_q4_1, "Q8_0": quant.from_q8_0, "Q4_K": quant.from_q4_k}


@dataclass(frozen=True)
class LlamaSpec:
    """What the GGUF says about the architecture."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_dim: int
    rope_theta: float
    rms_eps: float
    context_length: int
    tied_embeddings: bool
    has_rope_freqs: bool
    file_type: int


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFModel:
    """A Llama GGUF opened for conversion."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = gguf.GGUFReader(str(path))
        arch = field(self.reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ValueError(f"tensor {t.name} has type {t.tensor_type.name}; supported: {SUPPORTED_TYPES}")
        self.spec = self._spec()
        if self.spec.head_dim % 16:
            # onnxruntime's GroupQueryAttention kernels need it; fail at conversion, not at serving time.
            raise ValueError(f"head_dim {self.spec.head_dim} is not a multiple of 16")

    def _spec(self) -> LlamaSpec:
        r = self.reader
        hidden = int(field(r, "llama.embedding_length"))
        heads = int(field(r, "llama.attention.head_count"))
        kv = int(field(r, "llama.attention.head_count_kv", heads))
        head_dim = int(field(r, "llama.attention.key_length", hidden // heads))
        vocab = int(field(r, "llama.vocab_size", 0) or len(r.fields["tokenizer.ggml.tokens"].data))
        return LlamaSpec(
            name=str(field(r, "general.name", self.path.stem)),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(field(r, "llama.feed_forward_length")),
            num_layers=int(field(r, "llama.block_count")),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rope_dim=int(field(r, "llama.rope.dimension_count", head_dim)),
            rope_theta=float(field(r, "llama.rope.freq_base", 10000.0)),
            rms_eps=float(field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(field(r, "llama.context_length", 2048)),
            tied_embeddings="output.weight" not in self.tensors,
            has_rope_freqs="rope_freqs.weight" in self.tensors,
            file_type=int(field(r, "general.file_type", -1)),
        )

    def type_of(self, name: str) -> str:
        return str(self.tensors[name].tensor_type.name)

    def float_tensor(self, name: str) -> np.ndarray:
        """Any tensor dequantized to float32, in numpy order (rows = GGUF ne1, cols = ne0)."""
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape(shape)

    def linear(self, name: str, precision: str) -> QuantLinear:
        """A (N, K) linear weight for `precision` in {int4, int8}; exact where the block format allows."""
        t = self.tensors[name]
        k, n = int(t.shape[0]), int(t.shape[1])
        kind = t.tensor_type.name
        if k % quant.BLOCK:
            raise ValueError(f"{name}: K={k} is not a multiple of {quant.BLOCK}")
        loader = EXACT_LOADERS.get(kind)
        if precision == "int4":
            if loader is not None and kind != "Q8_0":
                return loader(np.asarray(t.data), n, k)
            return quant.quantize_affine4(self.float_tensor(name))
        if precision == "int8":
            if loader is not None:
                return quant.widen_to_8bit(loader(np.asarray(t.data), n, k))
            return quant.quantize_sym8(self.float_tensor(name))
        raise ValueError(f"precision must be int4 or int8 for quantized linears, got {precision!r}")

    def embedding_8bit(self, name: str) -> QuantLinear:
        """Token embedding / lm_head as an 8-bit block-32 matrix (vocab, hidden): exact from Q8_0 and Q4_*."""
        t = self.tensors[name]
        k, n = int(t.shape[0]), int(t.shape[1])
        loader = EXACT_LOADERS.get(t.tensor_type.name)
        if loader is not None:
            return quant.widen_to_8bit(loader(np.asarray(t.data), n, k))
        return quant.quantize_sym8(self.float_tensor(name))

    def rope_cos_sin(self, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
        """(max_positions, rope_dim/2) cos and sin caches; Llama 3 frequency factors applied if present."""
        s = self.spec
        half = s.rope_dim // 2
        inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / s.rope_dim))
        if s.has_rope_freqs:
            # llama.cpp divides the angle by these factors (Llama 3 rope scaling, precomputed by the converter)
            inv_freq = inv_freq / self.float_tensor("rope_freqs.weight").astype(np.float64).reshape(-1)[:half]
        pos = np.arange(max_positions, dtype=np.float64)
        ang = np.outer(pos, inv_freq)
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def unpermute_qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (GGUF rows are interleaved-rope order).

    The HF -> GGUF converter applies reshape(n_head, 2, d/2, K).swapaxes(1, 2); the inverse maps GGUF rows
    back to rotate-half order, so onnxruntime's non-interleaved rotary matches.
    """
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_max_positions(spec: LlamaSpec, cap: int | None) -> int:
    """Rotary cache length: the model's context, capped (Llama 3.2 declares 131072 positions)."""
    n = spec.context_length if cap is None else min(spec.context_length, cap)
    return max(1, math.ceil(n))
