"""Adds `hidden_states.<layer>` outputs (the residual stream entering a layer) to an existing ONNX decoder.

    python -m tools.add_hidden_outputs MODEL_DIR --layers 18,22 --out OUT_DIR

Works on decoders built from onnxruntime's fused norms, as our converter and onnxruntime-genai's builder
make them: layer 0's input norm is a SimplifiedLayerNormalization, and each later layer's input norm is
a SkipSimplifiedLayerNormalization whose 4th output is the residual sum (input + skip) = the hidden state
entering that layer (Hugging Face's `hidden_states[L]`). Layer 0's hidden state is the embedding output.
The weights are not copied: the new model.onnx points at the same external data file, hard-linked into
OUT_DIR with the folder's other files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"


def residual_tensors(graph: onnx.GraphProto, layers: list[int]) -> dict[int, str]:
    """Tensor name of the hidden state entering each requested layer (creating output names if unset)."""
    norms = [n for n in graph.node if n.op_type in (NORM, SKIP_NORM)]
    if not norms or norms[0].op_type != NORM:
        raise ValueError("expected the first layer norm to be a SimplifiedLayerNormalization")
    skips = [n for n in norms if n.op_type == SKIP_NORM]
    num_layers = len(skips) // 2  # per layer: post-attention norm and (next layer's or final) input norm
    out: dict[int, str] = {}
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
        if layer == 0:
            out[0] = norms[0].input[0]
            continue
        node = skips[2 * layer - 1]  # the input norm of `layer`: [ffn0, attn1, ffn1, attn2, ...]
        while len(node.output) < 4:
            node.output.append("")
        if not node.output[3]:
            node.output[3] = f"{node.name or 'skip_norm'}/residual_{layer}"
        out[layer] = node.output[3]
    return out


def add_hidden_outputs(model: onnx.ModelProto, layers: list[int], hidden_size: int) -> list[str]:
    """Adds Identity nodes and graph outputs `hidden_states.<L>` (batch, sequence_length, hidden)."""
    graph = model.graph
    existing = {o.name for o in graph.output}
    names = []
    for layer, tensor in residual_tensors(graph, layers).items():
        name = f"hidden_states.{layer}"
        if name in existing:
            raise ValueError(f"{name} is already an output")
        graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"{name}/Identity"))
        graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, ["batch_size", "sequence_length", hidden_size]))
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.add_hidden_outputs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--layers", required=True, help="comma-separated layer indices, e.g. 18,22")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    layers = [int(x) for x in a.layers.split(",") if x.strip()]
    model = onnx.load(str(a.model_dir / "model.onnx"), load_external_data=False)
    genai = json.loads((a.model_dir / "genai_config.json").read_text())
    names = add_hidden_outputs(model, layers, int(genai["model"]["decoder"]["hidden_size"]))
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.model_dir.iterdir():
        if f.name == "model.onnx" or not f.is_file():
            continue
        target = a.out / f.name
        target.unlink(missing_ok=True)
        try:
            os.link(f, target)  # the weights are shared, not copied
        except OSError:
            shutil.copy2(f, target)
    onnx.save_model(model, str(a.out / "model.onnx"))
    meta_path = a.out / "sluice_model.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta.setdefault("io", {})["hidden_states"] = sorted(set(meta["io"].get("hidden_states", [])) | set(names))
        meta_path.unlink()  # a hard link: write a new file, not through the link
        meta_path.write_text(json.dumps(meta, indent=2))
    print(json.dumps({"out": str(a.out), "outputs": names}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
