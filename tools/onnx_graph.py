"""Builds the decoder graph with onnxruntime's CPU contrib ops, in onnxruntime-genai's I/O convention.

Inputs:  input_ids int64 (batch, seq); attention_mask int64 (batch, total_seq);
         past_key_values.{i}.key|value float32 (batch, kv_heads, past_seq, head_dim)
Outputs: logits float32 (batch, 1, vocab) -- last position only (see `last_logits_only`);
         present.{i}.key|value; optionally hidden_states.{L} (batch, seq, hidden).
GroupQueryAttention reads past and writes present in one buffer when the caller binds the same memory to
both (max_seq sized), so a decode step copies no KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.quant import BLOCK, QuantLinear

MS = "com.microsoft"
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    _n: int = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str, n_out: int = 1, domain: str = "",
           outputs: Sequence[str] | None = None, **attrs: Any) -> list[str]:
        outs = list(outputs) if outputs is not None else [self.name(f"{hint}/out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(hint), domain=domain,
                                           **attrs))
        return outs

    def const_i64(self, name: str, values: Sequence[int]) -> str:
        return self.init(name, np.asarray(values, dtype=np.int64))


@dataclass(frozen=True)
class LinearOptions:
    accuracy_level: int = 4  # 4 = int8 activations in MatMulNBits (llama.cpp does the same with q8 dots)


def block_sums(g: GraphBuilder, x: str, k: int, hint: str) -> str:
    """(batch, seq, K) -> (batch, seq, K/32): the per-block activation sums the affine minimum needs."""
    shape = g.const_i64(g.name(f"{hint}/bs_shape"), [0, 0, k // BLOCK, BLOCK])
    r = g.op("Reshape", [x, shape], f"{hint}/bs_reshape")[0]
    axes = g.const_i64(g.name(f"{hint}/bs_axes"), [-1])
    return g.op("ReduceSum", [r, axes], f"{hint}/bs_sum", keepdims=0)[0]


def quant_linear(g: GraphBuilder, x: str, w: QuantLinear, hint: str, opts: LinearOptions,
                 bsum: str | None = None) -> str:
    """y = x @ W^T with MatMulNBits, plus blocksum(x) @ minimum^T for affine formats. Returns y's name."""
    n, k = w.shape
    nb = k // BLOCK
    shift = 0
    if w.minimum is not None and w.zero_point != 1 << (w.bits - 1):
        # Use MatMulNBits' default zero point (its fast kernels need it) and fold the difference into the
        # minimum: scale*(q - z0) + m == scale*(q - zd) + (m + scale*(zd - z0)).
        shift = (1 << (w.bits - 1)) - w.zero_point
        w = QuantLinear(w.codes, w.scale, w.minimum, w.bits, 1 << (w.bits - 1), w.exact)
    scales = g.init(f"{hint}.scales", w.scale.reshape(-1))
    ins = [x, g.init(f"{hint}.qweight", w.packed()), scales]
    if w.zero_point != 1 << (w.bits - 1):
        # MatMulNBits packs integer zero points like the weights; only a constant 0 (affine) is needed here.
        zp_len = n * ((nb * w.bits + 7) // 8)
        zp_val = w.zero_point | (w.zero_point << 4) if w.bits == 4 else w.zero_point
        ins.append(g.init(f"{hint}.zero_points", np.full(zp_len, zp_val, dtype=np.uint8)))
    y = g.op("MatMulNBits", ins, f"{hint}/MatMulNBits", domain=MS, K=k, N=n, bits=w.bits, block_size=BLOCK,
             accuracy_level=opts.accuracy_level)[0]
    if w.minimum is None:
        return y
    mins = np.ascontiguousarray(w.minimum.T)  # (K/32, N)
    as16 = mins.astype(np.float16)
    if np.array_equal(as16.astype(np.float32), mins):
        # GGUF minimums are float16: store them as such (exact) and let onnxruntime fold the Cast at load.
        m = g.op("Cast", [g.init(f"{hint}.minimum_f16", as16)], f"{hint}/min_cast", to=TensorProto.FLOAT)[0]
    else:
        m = g.init(f"{hint}.minimum", mins)
    if shift:
        st = g.op("Reshape", [scales, g.const_i64(g.name(f"{hint}/sc_shape"), [n, nb])], f"{hint}/sc_rows")[0]
        st = g.op("Transpose", [st], f"{hint}/sc_t", perm=[1, 0])[0]
        st = g.op("Mul", [st, g.init(f"{hint}.shift", np.asarray(shift, np.float32))], f"{hint}/sc_shift")[0]
        m = g.op("Add", [m, st], f"{hint}/min_shift")[0]
    s = bsum if bsum is not None else block_sums(g, x, k, hint)
    corr = g.op("MatMul", [s, m], f"{hint}/min_matmul")[0]  # (batch, seq, N)
    return g.op("Add", [y, corr], f"{hint}/add_min")[0]


def float_linear(g: GraphBuilder, x: str, w: np.ndarray, hint: str) -> str:
    """y = x @ W^T for fp32 exports; W stored transposed (K, N) for a plain MatMul."""
    wt = g.init(f"{hint}.weight", np.ascontiguousarray(w.T.astype(np.float32)))
    return g.op("MatMul", [x, wt], f"{hint}/MatMul")[0]
