"""Assembles a Llama decoder ONNX graph from a GGUF (see tools/onnx_graph.py for the I/O convention)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from tools.gguf_model import GGUFModel, unpermute_qk_rows
from tools.onnx_graph import MS, GraphBuilder, LinearOptions, float_linear, quant_linear
from tools.quant import QuantLinear, concat_rows

OPSET = 21


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "int4"  # int4 | int8 | fp32
    accuracy_level: int = 4
    max_positions: int = 8192
    hidden_layers: tuple[str, ...] = ()  # e.g. ("18", "22", "final"): extra outputs hidden_states.{name}


class _Weights:
    """Linear weights for one precision, recording what was done per source tensor type."""

    def __init__(self, model: GGUFModel, precision: str) -> None:
        self.model = model
        self.precision = precision
        self.report: Counter[str] = Counter()

    def quant(self, name: str, row_order: np.ndarray | None = None) -> QuantLinear:
        q = self.model.linear(name, self.precision)
        kind = self.model.type_of(name)
        self.report[f"{kind} -> {self.precision} {'exact' if q.exact else 're-quantized'}"] += 1
        return q if row_order is None else q.permute_rows(row_order)

    def dense(self, name: str, row_order: np.ndarray | None = None) -> np.ndarray:
        w = self.model.float_tensor(name)
        self.report[f"{self.model.type_of(name)} -> fp32 dequantized"] += 1
        return w if row_order is None else w[row_order]


def _io(spec_layers: int, kv_heads: int, head_dim: int, vocab: int, hidden: int,
        hidden_layers: Sequence[str]) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", 1, vocab])]
    for i in range(spec_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", f, ["batch_size", kv_heads, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", f, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
    for name in hidden_layers:
        outputs.append(helper.make_tensor_value_info(
            f"hidden_states.{name}", f, ["batch_size", "sequence_length", hidden]))
    return inputs, outputs


def _embedding(g: GraphBuilder, model: GGUFModel, w: _Weights) -> tuple[str, QuantLinear | np.ndarray]:
    """Token embedding gather; returns (hidden, the table) so a tied lm_head can share it."""
    if w.precision == "fp32":
        table = w.dense("token_embd.weight")  # (vocab, hidden)
        return g.op("Gather", [g.init("embed.weight", table), "input_ids"], "embed/Gather")[0], table
    q = model.embedding_8bit("token_embd.weight")
    w.report[f"{model.type_of('token_embd.weight')} -> embedding 8-bit {_how(q)}"] += 1
    vocab, hidden = q.shape
    codes = g.init("lm_head.qweight", q.packed())  # (vocab, hidden/32, 32) uint8, shared with the lm_head
    # One copy of the scales serves both the gather (viewed as (vocab, nb, 1)) and the tied lm_head.
    flat = g.init("lm_head.scales", q.scale.reshape(-1))
    scales = g.op("Reshape", [flat, g.const_i64("embed.scales_shape", [vocab, -1, 1])], "embed/ScalesRows")[0]
    rows = g.op("Gather", [codes, "input_ids"], "embed/GatherCodes")[0]  # (batch, seq, nb, 32)
    vals = g.op("Cast", [rows], "embed/Cast", to=TensorProto.FLOAT)[0]
    zp = g.init("embed.zero_point", np.asarray(q.zero_point, dtype=np.float32))
    vals = g.op("Sub", [vals, zp], "embed/Sub")[0]
    sc = g.op("Gather", [scales, "input_ids"], "embed/GatherScales")[0]  # (batch, seq, nb, 1)
    vals = g.op("Mul", [vals, sc], "embed/Mul")[0]
    if q.minimum is not None:
        mins = g.init("embed.minimum_rows", q.minimum.reshape(vocab, -1, 1))
        vals = g.op("Add", [vals, g.op("Gather", [mins, "input_ids"], "embed/GatherMin")[0]], "embed/AddMin")[0]
    shape = g.const_i64("embed.shape", [0, 0, hidden])
    return g.op("Reshape", [vals, shape], "embed/Reshape")[0], q


def _lm_head(g: GraphBuilder, x: str, table: QuantLinear | np.ndarray, model: GGUFModel,
             w: _Weights, opts: LinearOptions) -> str:
    tied = model.spec.tied_embeddings
    if isinstance(table, np.ndarray):
        if tied:
            t = g.op("Transpose", ["embed.weight"], "lm_head/Transpose", perm=[1, 0])[0]
            return g.op("MatMul", [x, t], "lm_head/MatMul", outputs=["logits"])[0]
        y = float_linear(g, x, w.dense("output.weight"), "lm_head")
        return g.op("Identity", [y], "lm_head/out", outputs=["logits"])[0]
    if tied:
        q = table  # counted once, as the embedding
        ins = [x, "lm_head.qweight", "lm_head.scales"]
    else:
        q = model.embedding_8bit("output.weight")
        ins = [x, g.init("lm_head.out_qweight", q.packed()), g.init("lm_head.out_scales", q.scale.reshape(-1))]
        w.report[f"{model.type_of('output.weight')} -> lm_head 8-bit {_how(q)}"] += 1
    if q.minimum is not None:  # affine 8-bit source: go through the generic path
        y = quant_linear(g, x, q, "lm_head.affine", opts)
        return g.op("Identity", [y], "lm_head/out", outputs=["logits"])[0]
    n, k = q.shape
    return g.op("MatMulNBits", ins, "lm_head/MatMulNBits", domain=MS, outputs=["logits"], K=k, N=n, bits=8,
                block_size=32, accuracy_level=opts.accuracy_level)[0]


def build(model: GGUFModel, opts: BuildOptions) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Returns the decoder model and a per-tensor-type report of what the conversion did."""
    s = model.spec
    g = GraphBuilder()
    w = _Weights(model, opts.precision)
    lopts = LinearOptions(accuracy_level=opts.accuracy_level)
    fp32 = opts.precision == "fp32"

    def linear(x: str, names: list[str], hint: str, orders: list[np.ndarray | None]) -> str:
        if fp32:
            return float_linear(g, x, np.concatenate([w.dense(nm, o) for nm, o in zip(names, orders, strict=True)]),
                                hint)
        parts = [w.quant(nm, o) for nm, o in zip(names, orders, strict=True)]
        return quant_linear(g, x, parts[0] if len(parts) == 1 else concat_rows(parts), hint, lopts)

    # seqlens_k = total valid length - 1 per row; total_sequence_length = mask width (GQA's contract)
    ax = g.const_i64("mask.axes", [1])
    lens = g.op("ReduceSum", ["attention_mask", ax], "mask/ReduceSum", keepdims=0)[0]
    lens = g.op("Sub", [lens, g.init("mask.one", np.asarray(1, dtype=np.int64))], "mask/Sub")[0]
    seqlens_k = g.op("Cast", [lens], "mask/CastSeqlens", to=TensorProto.INT32)[0]
    width = g.op("Shape", ["attention_mask"], "mask/Shape")[0]
    width = g.op("Gather", [width, g.init("mask.idx1", np.asarray(1, dtype=np.int64))], "mask/Width")[0]
    total = g.op("Cast", [width], "mask/CastTotal", to=TensorProto.INT32)[0]
    cos, sin = model.rope_cos_sin(opts.max_positions)
    g.init("cos_cache", cos)
    g.init("sin_cache", sin)

    h, table = _embedding(g, model, w)
    q_order = unpermute_qk_rows(s.num_heads * s.head_dim, s.num_heads)
    k_order = unpermute_qk_rows(s.num_kv_heads * s.head_dim, s.num_kv_heads)
    wanted = set(opts.hidden_layers)
    mlp_out: str | None = None
    for i in range(s.num_layers):
        p = f"blk.{i}"
        norm = g.init(f"{p}.attn_norm", model.float_tensor(f"{p}.attn_norm.weight"))
        if mlp_out is None:
            xn = g.op("SimplifiedLayerNormalization", [h, norm], f"{p}/attn_norm", axis=-1, epsilon=s.rms_eps,
                      stash_type=1)[0]
        else:
            xn, _, _, h = g.op("SkipSimplifiedLayerNormalization", [h, mlp_out, norm], f"{p}/attn_norm",
                               n_out=4, domain=MS, epsilon=s.rms_eps)
        if str(i) in wanted:
            g.op("Identity", [h], f"{p}/hidden", outputs=[f"hidden_states.{i}"])
        qkv = linear(xn, [f"{p}.attn_q.weight", f"{p}.attn_k.weight", f"{p}.attn_v.weight"], f"{p}.qkv",
                     [q_order, k_order, None])
        attn = g.op("GroupQueryAttention",
                    [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total,
                     "cos_cache", "sin_cache"],
                    f"{p}/GQA", domain=MS, outputs=[g.name(f"{p}/attn"), f"present.{i}.key", f"present.{i}.value"],
                    num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, scale=float(s.head_dim ** -0.5),
                    do_rotary=1, rotary_interleaved=0, local_window_size=-1)[0]
        o = linear(attn, [f"{p}.attn_output.weight"], f"{p}.o", [None])
        fnorm = g.init(f"{p}.ffn_norm", model.float_tensor(f"{p}.ffn_norm.weight"))
        xn2, _, _, h = g.op("SkipSimplifiedLayerNormalization", [h, o, fnorm], f"{p}/ffn_norm", n_out=4,
                            domain=MS, epsilon=s.rms_eps)
        gu = linear(xn2, [f"{p}.ffn_gate.weight", f"{p}.ffn_up.weight"], f"{p}.gate_up", [None, None])
        gate, up = g.op("Split", [gu, g.const_i64(f"{p}.split", [s.intermediate_size] * 2)], f"{p}/split",
                        n_out=2, axis=-1)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/sigmoid")[0]], f"{p}/silu")[0]
        act = g.op("Mul", [act, up], f"{p}/swiglu")[0]
        mlp_out = linear(act, [f"{p}.ffn_down.weight"], f"{p}.down", [None])
    assert mlp_out is not None
    if str(s.num_layers) in wanted:
        raise ValueError("use 'final' for the last hidden state")
    out_norm = g.init("output_norm", model.float_tensor("output_norm.weight"))
    if "final" in wanted:
        xf = g.op("SkipSimplifiedLayerNormalization", [h, mlp_out, out_norm], "final_norm", n_out=1, domain=MS,
                  epsilon=s.rms_eps)[0]
        g.op("Identity", [xf], "final/hidden", outputs=["hidden_states.final"])
        xf = _last(g, xf, "final")
    else:
        # Only the last position's logits are needed: prune before the norm (~30% faster prefill).
        xf = g.op("SkipSimplifiedLayerNormalization", [_last(g, h, "res"), _last(g, mlp_out, "mlp"), out_norm],
                  "final_norm", n_out=1, domain=MS, epsilon=s.rms_eps)[0]
    _lm_head(g, xf, table, model, w, lopts)

    inputs, outputs = _io(s.num_layers, s.num_kv_heads, s.head_dim, s.vocab_size, s.hidden_size,
                          opts.hidden_layers)
    graph = helper.make_graph(g.nodes, "sluice_llama", inputs, outputs, initializer=g.inits)
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                           producer_name="sluice-convert")
    mp.ir_version = 10
    return mp, dict(w.report)


def _last(g: GraphBuilder, x: str, hint: str) -> str:
    """(batch, seq, d) -> (batch, 1, d): the last position."""
    starts, ends = g.const_i64(g.name(f"{hint}/st"), [-1]), g.const_i64(g.name(f"{hint}/en"), [2**62])
    axes = g.const_i64(g.name(f"{hint}/ax"), [1])
    return g.op("Slice", [x, starts, ends, axes], f"{hint}/last")[0]


def _how(q: QuantLinear) -> str:
    return "exact" if q.exact else "re-quantized"
