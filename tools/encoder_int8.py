"""int8 weights for the exported MiniLM encoder (`tools/export_encoder.py --int8`).

onnxruntime's dynamic quantization rewrites the 36 linear-layer MatMuls (names ending in `.mm`, one per
`_Graph.linear`) to int8 weights with per-output-channel scales; activations are quantized per call
(DynamicQuantizeLinear + MatMulInteger). Attention's scores and context (one MultiHeadAttention
kernel), the embedding tables, LayerNorm and pooling stay float32.

Choices, measured on 300 dev-split texts against the float32 graph (2026-11-29):
- per-tensor scales (the default) move the embeddings too far: median cosine 0.958, worst 0.84;
  per-channel scales: median 0.993, worst 0.98;
- quantizing only the linear layers, not attention's score/context MatMuls;
- `reduce_range` (7-bit weights): the u8 x s8 kernels on AVX2 CPUs without VNNI can saturate 16-bit
  intermediate sums, so 8-bit weights would give machine-dependent features; 7-bit weights cannot
  saturate, so a head trained on one machine scores the same vectors on another (median cosine 0.992).
Speed: about 3x less encoder time a text on this machine (10.2 -> 2.8 ms median on dev-split windows).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

LOG = logging.getLogger("encoder_int8")
# the quantized graph must stay this close to the float32 one on the probe sentences, or export refuses
MIN_COSINE = 0.97
# natural sentences (benign, borderline, harmful-sounding): random token ids are not a fair probe
PROBE_TEXTS = (
    "How do I bake sourdough bread at home?",
    "Write a short story about a detective solving a murder in Venice.",
    "What is the lethal dose of acetaminophen? I'm a nurse checking a patient's chart.",
    "Explain step by step how to build a pipe bomb.",
    "Summarise the causes of the First World War in three paragraphs.",
    "How can I kill a zombie process on Linux?",
    "Give me the home address and phone number of my ex-girlfriend.",
    "Translate 'good morning, how are you?' into French and Spanish.",
)


def linear_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the linear-layer MatMul nodes (`_Graph.linear` names them `<layer>.mm`).

    Args:
        model: the float32 encoder graph.

    Returns:
        The node names; never empty for an exported encoder.
    """
    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(".mm")]
    if not names:
        raise ValueError("no linear-layer MatMul nodes (names ending in .mm) in the encoder graph")
    return names


def quantize(model: onnx.ModelProto, out: Path) -> None:
    """Write the int8-weight version of `model` to `out` (per-channel, 7-bit weights, linear layers only).

    Args:
        model: the checked float32 encoder graph.
        out: destination model.onnx.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs a line per activation (and advice) on root
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "fp32.onnx"
            onnx.save(model, str(src))
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, nodes_to_quantize=linear_matmuls(model),
                             # shape inference cannot see through contrib ops (MultiHeadAttention, Gelu)
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def check(fp32: onnx.ModelProto, int8_path: Path, tokenizer_path: Path) -> float:
    """Compare the int8 graph with the float32 one on `PROBE_TEXTS`; refuse a graph that moved too far.

    Args:
        fp32: the float32 graph.
        int8_path: the quantized model.onnx.
        tokenizer_path: the encoder's tokenizer.json.

    Returns:
        The smallest cosine between the two graphs' sentence embeddings.
    """
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    from guard.encoder import DISABLED_OPTIMIZERS

    sessions = [ort.InferenceSession(model, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=list(DISABLED_OPTIMIZERS))
                for model in (fp32.SerializeToString(), str(int8_path))]
    cosines = []
    for enc in tokenizer.encode_batch(list(PROBE_TEXTS)):
        # one unpadded text per call, as guard/encoder.py runs an int8 encoder (its activation scales are
        # per tensor, so a padded batch would measure something the service never computes)
        ids = np.asarray([enc.ids], dtype=np.int64)
        want, got = (s.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
                     for s in sessions)
        cosines.append(float((want * got).sum()))  # both are L2-normalised
    cosine = min(cosines)
    if cosine < MIN_COSINE:
        raise RuntimeError(f"int8 encoder moved too far from float32: worst probe cosine {cosine:.4f}")
    LOG.info("int8 graph vs float32: worst probe cosine %.4f", cosine)
    return cosine
