"""Writes small synthetic Llama GGUFs with `gguf.GGUFWriter`: any tensor type, tied or separate output,
Llama 3 rope factors, and a minimal byte-level BPE vocabulary, so the converter can be tested on models
other than the embedded SmolLM2 (shapes and options as Llama 3.2 uses them) in well under a second.

Weights are random. Types `gguf.quants.quantize` supports (F16 via numpy, BF16, Q4_0, Q4_1, Q8_0) are
quantized from a normal draw; K-quants (Q4_K, Q5_K, Q6_K), which it cannot quantize, are random valid
blocks (random codes and sub-block scales, float16 super-block scales sized for a ~0.1 weight spread).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
# Byte offsets of the float16 super-block scales inside one block, per K-quant (ggml-common.h layouts).
K_QUANT_F16 = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
WEIGHT_STD = 0.1


@dataclass(frozen=True)
class TinySpec:
    """A synthetic Llama. `types` maps a tensor role ("token_embd", "attn_q", ..., "output") or a full
    tensor name ("blk.1.ffn_down.weight", which wins) to its GGUF type; unlisted tensors are F32."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    ffn: int = 256  # a multiple of 256 so ffn_down can be a K-quant (super-blocks of 256)
    rope_base: float = 10000.0
    rope_freqs: bool = False
    tied: bool = True
    types: Mapping[str, T] = field(default_factory=dict)
    pre: str = "llama-bpe"
    seed: int = 0


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are spelled in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """256 byte tokens, a few merges of English pieces, then control tokens: (tokens, types, merges)."""
    enc = bytes_to_unicode()
    tokens = [enc[b] for b in range(256)]
    merges: list[str] = []
    for word in ("Ġt", "he", "Ġthe", "in", "er", "Ġa", "on", "Ġw", "or", "an", "Ġs", "is", "Ġis", "at", "en"):
        left, right = (word[:-2], word[-2:]) if word in ("Ġthe", "Ġis") else (word[:-1], word[-1])
        merges.append(f"{left} {right}")
        tokens.append(word)
    types = [1] * len(tokens) + [3] * len(SPECIAL_TOKENS)  # 1 normal, 3 control (llama.cpp token types)
    return tokens + list(SPECIAL_TOKENS), types, merges


def llama3_rope_factors(spec: TinySpec, factor: float = 8.0, original_context: int = 256) -> np.ndarray:
    """The `rope_freqs` llama.cpp's converter writes for Llama 3 scaling (low 1, high 4), for this head size.

    A small `original_context` puts the smooth band inside this tiny model's frequencies, so positions
    under 20 already see factors between 1 and `factor` (Llama 3.2 uses 8192 and 32).
    """
    dim = spec.hidden // spec.heads
    freqs = 1.0 / spec.rope_base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    low_wavelen, high_wavelen = original_context / 1.0, original_context / 4.0
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _k_quant_blocks(rng: np.random.Generator, qtype: T, n: int, k: int) -> np.ndarray:
    """Random valid K-quant bytes (n, k/256 * block_bytes) whose weights spread ~WEIGHT_STD around 0."""
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // 256, size), dtype=np.uint8)
    # Per-super-block scale that maps the largest code * sub-block scale to ~3 std.
    span = {T.Q4_K: 15 * 63, T.Q5_K: 31 * 63, T.Q6_K: 32 * 128}[qtype]
    d = (rng.uniform(0.5, 1.0, size=(n, k // 256)) * 3 * WEIGHT_STD / span).astype(np.float16)
    d_at = K_QUANT_F16[qtype][0]
    raw[..., d_at : d_at + 2] = d.view(np.uint8).reshape(n, k // 256, 2)
    if qtype == T.Q6_K:  # w = d * sc * (q - 32): already centred
        return raw.reshape(n, -1)
    # Q4_K/Q5_K: w = d*sc*q - dmin*m. Equal 6-bit sc and m per sub-block (scale bytes 4..7 copied to 8..11,
    # equal nibbles in 12..15) and dmin = d * (max code / 2) centre every sub-block on zero, as real
    # quantizers do; uncentred random blocks make activations explode through the layers.
    raw[..., 8:12] = raw[..., 4:8]
    raw[..., 12:16] = (raw[..., 12:16] & 0x0F) * 0x11
    dmin = (d.astype(np.float32) * (7.5 if qtype == T.Q4_K else 15.5)).astype(np.float16)
    raw[..., 2:4] = dmin.view(np.uint8).reshape(n, k // 256, 2)
    return raw.reshape(n, -1)


def add_weight(w: gguf.GGUFWriter, rng: np.random.Generator, name: str, shape: tuple[int, int], qtype: T) -> None:
    """Adds a random (rows, cols) tensor of `qtype` (numpy order; GGUF ne = (cols, rows))."""
    if qtype in K_QUANT_F16:
        w.add_tensor(name, _k_quant_blocks(rng, qtype, *shape), raw_dtype=qtype)
        return
    values = (rng.standard_normal(shape) * WEIGHT_STD).astype(np.float32)
    if qtype == T.F32:
        w.add_tensor(name, values)
    elif qtype == T.F16:
        w.add_tensor(name, values.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def _tensor_type(spec: TinySpec, name: str) -> T:
    role = name.split(".")[-2]
    return spec.types.get(name, spec.types.get(role, T.F32))


def write_tiny_llama(path: Path, spec: TinySpec) -> Path:
    """Writes the GGUF described by `spec` to `path` and returns `path`."""
    rng = np.random.default_rng(spec.seed)
    tokens, token_types, merges = vocabulary()
    head_dim = spec.hidden // spec.heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(512)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_block_count(spec.layers)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_eot_token_id(tokens.index("<|eot_id|>"))

    def norm(name: str, size: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    add_weight(w, rng, "token_embd.weight", (len(tokens), spec.hidden), _tensor_type(spec, "token_embd.weight"))
    if spec.rope_freqs:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(spec))
    kv = spec.kv_heads * head_dim
    shapes = {"attn_q": (spec.hidden, spec.hidden), "attn_k": (kv, spec.hidden), "attn_v": (kv, spec.hidden),
              "attn_output": (spec.hidden, spec.hidden), "ffn_gate": (spec.ffn, spec.hidden),
              "ffn_up": (spec.ffn, spec.hidden), "ffn_down": (spec.hidden, spec.ffn)}
    for i in range(spec.layers):
        norm(f"blk.{i}.attn_norm.weight", spec.hidden)
        norm(f"blk.{i}.ffn_norm.weight", spec.hidden)
        for role in LINEAR_ROLES:
            name = f"blk.{i}.{role}.weight"
            add_weight(w, rng, name, shapes[role], _tensor_type(spec, name))
    norm("output_norm.weight", spec.hidden)
    if not spec.tied:
        add_weight(w, rng, "output.weight", (len(tokens), spec.hidden), _tensor_type(spec, "output.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_non_llama(path: Path) -> Path:
    """A one-tensor GGUF whose architecture is gpt2: the converter must refuse it."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
