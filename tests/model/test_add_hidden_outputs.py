"""tools/add_hidden_outputs.py adds the same hidden states the converter exports with --hidden-layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tools.add_hidden_outputs import main as add_main
from tools.convert_gguf import main as convert_main

GGUF = Path(__file__).resolve().parents[2] / ".cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646]  # "<|im_start|>system\nYou are a helpful AI" (ChatML)


def _run(folder: Path, names: list[str]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([IDS], np.int64),
                                    "attention_mask": np.ones((1, len(IDS)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)  # (1, kv_heads, 0, head_dim)
    return list(sess.run(names, feeds))


def test_added_outputs_equal_converter_hidden_states(model_dir: Path, tmp_path: Path) -> None:
    added = tmp_path / "added"
    assert add_main([str(model_dir), "--layers", "0,18,22", "--out", str(added)]) == 0
    exported = tmp_path / "exported"
    assert convert_main([str(GGUF), "--out", str(exported), "--hidden-layers", "18,22"]) == 0
    names = ["hidden_states.18", "hidden_states.22"]
    ours, ref = _run(added, [*names, "logits"]), _run(exported, [*names, "logits"])
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)
    hidden = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]["hidden_size"]
    assert ours[0].shape == (1, len(IDS), hidden)
    assert json.loads((added / "sluice_model.json").read_text())["io"]["hidden_states"] == [
        "hidden_states.0", "hidden_states.18", "hidden_states.22"]
    assert json.loads((model_dir / "sluice_model.json").read_text())["io"]["hidden_states"] == []  # untouched
    (emb,) = _run(added, ["hidden_states.0"])
    assert emb.shape[:2] == (1, len(IDS)) and not np.array_equal(emb, ours[0])
