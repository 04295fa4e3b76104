"""tools/encoder_int8.py on a tiny random BERT: which MatMuls become int8, and how far the output moves."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.unit.test_classifier import tiny_bert
from tools import encoder_int8, export_encoder

CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 2, "layer_norm_eps": 1e-12}


def test_only_the_linear_layers_are_quantized(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    weights = tiny_bert(np.random.default_rng(3), hidden=32, inter=64)
    model = export_encoder.build_model(weights, CONFIG)
    assert len(encoder_int8.linear_matmuls(model)) == 6 * 2  # q, k, v, attention out, intermediate, output
    encoder_int8.quantize(model, tmp_path / "model.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    assert ops["MatMulInteger"] == 12
    assert ops["MatMul"] == 0 and ops["MultiHeadAttention"] == 2  # scores and context: one float32 kernel
    assert not any(init.data_type == onnx.TensorProto.FLOAT and init.name.endswith(".weight_t")
                   for init in onnx.load(str(tmp_path / "model.onnx")).graph.initializer)
    ids = np.random.default_rng(4).integers(0, 50, size=(3, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["sentence_embedding"], feeds)
    (got,) = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["sentence_embedding"], feeds)
    cosine = (want * got).sum(axis=1)
    assert np.all(cosine > 0.95), cosine
    assert np.all(cosine < 1.0 - 1e-7), "int8 weights changed nothing"


def test_a_graph_without_linear_layers_is_refused() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["a", "a"], ["b"], name="scores")], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, 2])],
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2, 2])])
    with pytest.raises(ValueError, match="linear-layer"):
        encoder_int8.linear_matmuls(onnx.helper.make_model(graph))


def test_int8_weights_are_their_own_feature_space() -> None:
    sha = "cd" * 32
    version = export_encoder.EXPORT_VERSION
    assert export_encoder.feature_name(None, int8=True) == f"minilm-l6-v2+int8v{version}/mean-l2"
    assert export_encoder.feature_name(sha, int8=True) == f"minilm-l6-v2+lora-cdcdcdcdcdcd+int8v{version}/mean-l2"
    assert export_encoder.feature_name(sha) != export_encoder.feature_name(sha, int8=True)
