"""tools/quant.py against outside references: `gguf.quants.dequantize` for every GGUF block loader, and
onnxruntime's MatMulNBits (a one-node graph from tools.onnx_graph.quant_linear) for the packed layout.

Random blocks are valid by construction: random codes and sub-block scales are all legal bytes, and the
float16 scale fields are overwritten with finite values of a realistic size.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from onnx import TensorProto, helper

from tests.model.tiny_gguf import K_QUANT_F16, TinySpec, write_tiny_llama
from tools import quant
from tools.gguf_model import GGUFModel, unpermute_qk_rows
from tools.onnx_graph import MS, GraphBuilder, LinearOptions, quant_linear
from tools.quant import BLOCK, QuantLinear

LOADERS = {T.Q4_0: quant.from_q4_0, T.Q4_1: quant.from_q4_1, T.Q8_0: quant.from_q8_0, T.Q4_K: quant.from_q4_k}
# Byte offsets of float16 fields per block, with the range drawn for each (d: scale, m: min or dmin).
F16_FIELDS = {T.Q4_0: ((0, -0.05, 0.05),), T.Q4_1: ((0, 0.0, 0.05), (2, -0.5, 0.5)),
              T.Q8_0: ((0, -0.01, 0.01),)}
N_ROWS, K_COLS = 12, 512  # K a multiple of 256 so K-quants fit


def random_blocks(rng: np.random.Generator, qtype: T, n: int = N_ROWS, k: int = K_COLS) -> np.ndarray:
    """(n, bytes per row) of random, valid `qtype` blocks."""
    size, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // size, nbytes), dtype=np.uint8)
    fields = F16_FIELDS.get(qtype) or tuple((off, 0.0, 1e-3) for off in K_QUANT_F16[qtype])
    for off, lo, hi in fields:
        value = rng.uniform(lo, hi, size=(n, k // size)).astype(np.float16)
        raw[..., off : off + 2] = value.view(np.uint8).reshape(n, k // size, 2)
    return raw.reshape(n, -1)


def gguf_quantized(rng: np.random.Generator, qtype: T, n: int = N_ROWS, k: int = K_COLS) -> np.ndarray:
    """Blocks made by gguf's own quantizer from a normal draw (Q4_0, Q4_1, Q8_0 only)."""
    return np.asarray(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype))


@pytest.mark.parametrize("qtype", list(LOADERS), ids=lambda t: t.name)
def test_loader_dequantizes_exactly_like_gguf_random_blocks(qtype: T) -> None:
    raw = random_blocks(np.random.default_rng(1), qtype)
    q = LOADERS[qtype](raw, N_ROWS, K_COLS)
    np.testing.assert_array_equal(q.dequantize(), gguf.quants.dequantize(raw, qtype))
    assert q.exact
    assert q.codes.shape == (N_ROWS, K_COLS) and q.scale.shape == (N_ROWS, K_COLS // BLOCK)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_loader_dequantizes_exactly_like_gguf_quantizer_output(qtype: T) -> None:
    raw = gguf_quantized(np.random.default_rng(2), qtype)
    q = LOADERS[qtype](raw, N_ROWS, K_COLS)
    np.testing.assert_array_equal(q.dequantize(), gguf.quants.dequantize(raw, qtype))


def test_q4_k_sub_blocks_are_affine_with_block_32() -> None:
    raw = random_blocks(np.random.default_rng(3), T.Q4_K)
    q = quant.from_q4_k(raw, N_ROWS, K_COLS)
    # 8 sub-blocks per 256-value super-block, each with its own scale and minimum, codes 0..15
    assert q.minimum is not None and q.minimum.shape == (N_ROWS, K_COLS // BLOCK)
    assert q.bits == 4 and q.zero_point == 0 and int(q.codes.max()) <= 15
    assert np.all(q.minimum <= 0)  # -dmin * m with dmin >= 0 here and 6-bit m >= 0


@pytest.mark.parametrize("qtype", list(LOADERS), ids=lambda t: t.name)
def test_widen_to_8bit_is_exact(qtype: T) -> None:
    q = LOADERS[qtype](random_blocks(np.random.default_rng(4), qtype), N_ROWS, K_COLS)
    wide = quant.widen_to_8bit(q)
    assert wide.bits == 8 and wide.zero_point == 128 and wide.exact
    np.testing.assert_array_equal(wide.dequantize(), q.dequantize())
    assert quant.widen_to_8bit(wide) is wide


def test_widen_centres_affine_codes() -> None:
    q = quant.from_q4_1(random_blocks(np.random.default_rng(5), T.Q4_1), N_ROWS, K_COLS)
    wide = quant.widen_to_8bit(q)
    # 4-bit codes 0..15 become 8-bit 120..135: (q - 8) around the 8-bit zero point 128
    assert int(wide.codes.min()) >= 120 and int(wide.codes.max()) <= 135


def test_packed_nibble_order() -> None:
    codes = np.tile(np.arange(BLOCK, dtype=np.uint8) % 16, (2, 2))  # (2, 64)
    q = QuantLinear(codes, np.ones((2, 2), np.float32), None, 4, 8, False)
    p = q.packed()
    assert p.shape == (2, 2, BLOCK // 2)
    # byte i holds element 2i in its low nibble and element 2i+1 in its high nibble
    assert p[0, 0, 0] == 0x10 and p[0, 0, 1] == 0x32 and p[1, 1, 7] == 0xFE
    assert QuantLinear(codes, q.scale, None, 8, 128, False).packed().shape == (2, 2, BLOCK)


def _run_linear(q: QuantLinear, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    """x (batch, seq, K) through a graph holding only `quant_linear(q)`, in onnxruntime."""
    g = GraphBuilder()
    y = quant_linear(g, "x", q, "lin", LinearOptions(accuracy_level=accuracy_level))
    g.op("Identity", [y], "out", outputs=["y"])
    n, k = q.shape
    graph = helper.make_graph(
        g.nodes, "one_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _linear_cases() -> dict[str, QuantLinear]:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    q4_1 = quant.from_q4_1(gguf_quantized(rng, T.Q4_1, 48, 256), 48, 256)
    q4_0 = quant.from_q4_0(gguf_quantized(rng, T.Q4_0, 48, 256), 48, 256)
    codes = rng.integers(0, 16, size=(48, 256), dtype=np.uint8)
    scale = rng.uniform(0.01, 0.1, size=(48, 8)).astype(np.float32)
    return {
        "q4_0 (zero point 8)": q4_0,
        "q4_1 (minimum, zero-point shift)": q4_1,
        "q4_k (minimum)": quant.from_q4_k(random_blocks(rng, T.Q4_K, 48, 256), 48, 256),
        "q8_0 (8-bit)": quant.from_q8_0(gguf_quantized(rng, T.Q8_0, 48, 256), 48, 256),
        "q4_1 widened (8-bit + minimum)": quant.widen_to_8bit(q4_1),
        "q4_0 widened": quant.widen_to_8bit(q4_0),
        "affine4 (float32 minimum)": quant.quantize_affine4(w),
        "sym8": quant.quantize_sym8(w),
        "4-bit explicit zero point 0": QuantLinear(codes, scale, None, 4, 0, False),
        "8-bit explicit zero point 0": QuantLinear(codes * 16, scale, None, 8, 0, False),
    }


@pytest.mark.parametrize("name", list(_linear_cases()))
def test_matmulnbits_matches_numpy(name: str) -> None:
    q = _linear_cases()[name]
    x = np.random.default_rng(7).standard_normal((2, 3, q.shape[1])).astype(np.float32)
    expected = x.astype(np.float64) @ q.dequantize().T.astype(np.float64)
    scale = float(np.abs(expected).max())
    # accuracy_level 0: float activations, so only float32 rounding separates the two
    exact = _run_linear(q, x, accuracy_level=0)
    assert np.abs(exact - expected).max() <= 1e-5 * scale
    # accuracy_level 4 (the export default): int8 activations per block, a bounded ~1% error
    fast = _run_linear(q, x, accuracy_level=4)
    assert np.abs(fast - expected).max() <= 2e-2 * scale


def test_quantize_affine4_error_bound() -> None:
    w = np.random.default_rng(8).standard_normal((16, 128)).astype(np.float32)
    w[3, :32] = 0.25  # a constant block is represented exactly
    q = quant.quantize_affine4(w)
    assert not q.exact and q.bits == 4 and q.zero_point == 0
    err = np.abs(q.dequantize() - w).reshape(16, 4, BLOCK).max(-1)
    assert np.all(err <= q.scale / 2 * (1 + 1e-5) + 1e-7)  # round to nearest: half a step
    np.testing.assert_array_equal(q.dequantize()[3, :32], w[3, :32])


def test_quantize_affine4_recovers_q4_1_grid() -> None:
    raw = random_blocks(np.random.default_rng(9), T.Q4_1)
    raw.reshape(N_ROWS, -1, 20)[..., 4] = 0xF0  # element 0 has code 0, element 16 code 15: blocks span the grid
    w = gguf.quants.dequantize(raw, T.Q4_1)
    src = quant.from_q4_1(raw, N_ROWS, K_COLS)
    step = np.repeat(src.scale, BLOCK, axis=1)
    # a weight already on a 4-bit affine grid comes back within float rounding of itself
    assert np.all(np.abs(quant.quantize_affine4(w).dequantize() - w) <= 1e-3 * step + 1e-7)


def test_quantize_sym8_error_bound() -> None:
    w = np.random.default_rng(10).standard_normal((16, 128)).astype(np.float32)
    w[5] = 0.0
    q = quant.quantize_sym8(w)
    assert q.bits == 8 and q.zero_point == 128 and q.minimum is None and not q.exact
    err = np.abs(q.dequantize() - w).reshape(16, 4, BLOCK).max(-1)
    assert np.all(err <= q.scale / 2 * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(q.dequantize()[5], 0.0)


def test_concat_rows_stacks_outputs() -> None:
    rng = np.random.default_rng(11)
    a = quant.from_q4_1(random_blocks(rng, T.Q4_1, 8, 256), 8, 256)
    b = quant.quantize_affine4(rng.standard_normal((4, 256)).astype(np.float32))
    c = QuantLinear(rng.integers(0, 16, (6, 256), dtype=np.uint8), np.ones((6, 8), np.float32), None, 4, 0, True)
    fused = quant.concat_rows([a, b, c])
    assert fused.shape == (18, 256) and not fused.exact  # b was re-quantized
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([p.dequantize() for p in (a, b, c)]))
    assert quant.concat_rows([a, a]).exact


def test_concat_rows_refuses_mixed_bit_widths() -> None:
    a = quant.from_q8_0(random_blocks(np.random.default_rng(12), T.Q8_0), N_ROWS, K_COLS)
    b = quant.from_q4_0(random_blocks(np.random.default_rng(12), T.Q4_0), N_ROWS, K_COLS)
    with pytest.raises(ValueError, match="bit widths"):
        quant.concat_rows([a, b])


def test_concat_rows_fuses_q4_0_with_affine_parts() -> None:
    """A GGUF may store q/k as Q4_0 and v in another type (re-quantized affine at int4): the fused qkv must
    still build. Fails today: concat_rows refuses different zero points (8 vs 0) with the same bit width."""
    rng = np.random.default_rng(13)
    a = quant.from_q4_0(random_blocks(rng, T.Q4_0, 8, 256), 8, 256)
    b = quant.from_q4_1(random_blocks(rng, T.Q4_1, 4, 256), 4, 256)
    fused = quant.concat_rows([a, b])
    expected = np.concatenate([a.dequantize(), b.dequantize()])
    np.testing.assert_allclose(fused.dequantize(), expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))


def test_permute_rows_reorders_outputs() -> None:
    q = quant.from_q4_1(random_blocks(np.random.default_rng(14), T.Q4_1), N_ROWS, K_COLS)
    order = np.random.default_rng(15).permutation(N_ROWS)
    np.testing.assert_array_equal(q.permute_rows(order).dequantize(), q.dequantize()[order])


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> GGUF interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("heads", "head_dim"), [(9, 64), (8, 64), (2, 16), (32, 128)])
def test_unpermute_qk_rows_inverts_llama_cpp(heads: int, head_dim: int) -> None:
    hf = np.random.default_rng(16).standard_normal((heads * head_dim, 3))
    order = unpermute_qk_rows(heads * head_dim, heads)
    np.testing.assert_array_equal(llama_cpp_permute(hf, heads)[order], hf)


def test_unpermuted_rows_turn_interleaved_rope_into_rotate_half() -> None:
    """What the permutation is for: llama.cpp's interleaved rope on GGUF rows equals HF rotate-half rope
    on the un-permuted rows, which is what GroupQueryAttention(rotary_interleaved=0) computes."""
    heads, d, pos = 2, 8, 5
    rng = np.random.default_rng(17)
    q_gguf = rng.standard_normal(heads * d)
    ang = pos * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(ang), np.sin(ang)
    pairs = q_gguf.reshape(heads, d // 2, 2)  # interleaved: (x[2i], x[2i+1]) rotate together
    inter = np.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], -1)
    order = unpermute_qk_rows(heads * d, heads)
    halves = q_gguf[order].reshape(heads, d)
    a, b = halves[:, : d // 2], halves[:, d // 2 :]
    rotate_half = np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
    np.testing.assert_allclose(inter.reshape(-1)[order].reshape(heads, d), rotate_half, atol=1e-12)


TYPE_CASES = {
    # GGUF type: (int4 exact?, int8 exact?)
    T.F32: (False, False), T.F16: (False, False), T.BF16: (False, False), T.Q8_0: (False, True),
    T.Q4_0: (True, True), T.Q4_1: (True, True), T.Q4_K: (True, True), T.Q5_K: (False, False),
    T.Q6_K: (False, False),
}


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory: pytest.TempPathFactory) -> GGUFModel:
    """A 1-layer llama GGUF whose ffn_down (K = 256) is stored once per type, one type per layer."""
    types = {f"blk.{i}.ffn_down.weight": t for i, t in enumerate(TYPE_CASES)}
    spec = TinySpec(layers=len(TYPE_CASES), types=types)
    return GGUFModel(write_tiny_llama(tmp_path_factory.mktemp("typed") / "typed.gguf", spec))


@pytest.mark.parametrize("qtype", list(TYPE_CASES), ids=lambda t: t.name)
def test_gguf_model_linear_per_type(typed_gguf: GGUFModel, qtype: T) -> None:
    i = list(TYPE_CASES).index(qtype)
    name = f"blk.{i}.ffn_down.weight"
    assert typed_gguf.type_of(name) == qtype.name
    w = typed_gguf.float_tensor(name)  # gguf's own dequantization, (64, 256)
    for precision, exact in zip(("int4", "int8"), TYPE_CASES[qtype], strict=True):
        q = typed_gguf.linear(name, precision)
        assert q.exact is exact and q.bits == int(precision[-1])
        err = np.abs(q.dequantize() - w).reshape(64, -1, BLOCK).max(-1)
        if exact:
            np.testing.assert_array_equal(q.dequantize(), w)
        else:  # re-quantized per block of 32: within half a quantization step of gguf's values
            assert np.all(err <= q.scale / 2 * (1 + 1e-5) + 1e-7)


def test_embedding_8bit_exact_from_block_formats(tmp_path: Path) -> None:
    for qtype, exact in ((T.Q8_0, True), (T.Q4_0, True), (T.Q4_1, True), (T.F16, False)):
        model = GGUFModel(write_tiny_llama(tmp_path / f"{qtype.name}.gguf", TinySpec(types={"token_embd": qtype})))
        q = model.embedding_8bit("token_embd.weight")
        table = model.float_tensor("token_embd.weight")
        assert q.bits == 8 and q.exact is exact
        if exact:
            np.testing.assert_array_equal(q.dequantize(), table)
        else:
            assert np.abs(q.dequantize() - table).max() <= np.abs(table).max() / 254 * (1 + 1e-5)
