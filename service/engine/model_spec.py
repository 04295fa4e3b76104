"""What a model folder says about itself: sizes, KV layout, special tokens, context length.

Model facts come from the folder, never from code. Two layouts load:
- ours (`sluice_model.json`, written by tools/convert_gguf.py), and
- an onnxruntime-genai export (`genai_config.json` with the same I/O names), e.g. the official
  Llama-3.2-1B-Instruct int4 ONNX.
Layer count, KV heads, head size and KV dtype are read from the session's own input metadata
(`session.py`), then cross-checked against these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelFolderError(ValueError):
    """The folder is not a loadable model (missing files, inconsistent metadata)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Facts about one model folder.

    Args:
        path: the folder.
        name: human-readable model name.
        precision: int4 / int8 / fp32 / unknown.
        context_length: maximum positions the export supports (rotary cache length).
        eos_ids: ids that end generation (EOS plus end-of-turn tokens).
        shared_kv_buffer: True when past and present may share one buffer (GroupQueryAttention).
        hidden_state_outputs: names of extra `hidden_states.*` outputs, if the export has them.
    """

    path: Path
    name: str
    precision: str
    context_length: int
    vocab_size: int
    eos_ids: frozenset[int]
    shared_kv_buffer: bool
    hidden_state_outputs: tuple[str, ...]
    source_sha256: str | None

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} is not a JSON object")
    return data


def load_model_spec(path: Path) -> ModelSpec:
    """Reads a model folder's metadata. Raises ModelFolderError with a clear message."""
    if not (path / "model.onnx").exists():
        raise ModelFolderError(f"{path}: no model.onnx (build it with `make model` or tools/convert_gguf.py)")
    if (path / "sluice_model.json").exists():
        meta = _read_json(path / "sluice_model.json")
        cfg, tokens, io = meta["config"], meta["tokens"], meta.get("io", {})
        return ModelSpec(
            path=path,
            name=str(meta.get("name", path.name)),
            precision=str(meta.get("precision", "unknown")),
            context_length=int(cfg["context_length"]),
            vocab_size=int(cfg["vocab_size"]),
            eos_ids=frozenset(int(i) for i in tokens["eos_token_ids"]),
            shared_kv_buffer=io.get("attention") == "GroupQueryAttention",
            hidden_state_outputs=tuple(io.get("hidden_states", ())),
            source_sha256=meta.get("source", {}).get("sha256"),
        )
    if (path / "genai_config.json").exists():
        genai = _read_json(path / "genai_config.json")
        model = genai.get("model", {})
        eos = model.get("eos_token_id")
        eos_ids = frozenset(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
        return ModelSpec(
            path=path,
            name=path.name,
            precision="unknown",
            context_length=int(model.get("context_length", 2048)),
            vocab_size=int(model.get("vocab_size", 0)),
            eos_ids=eos_ids,
            shared_kv_buffer=bool(genai.get("search", {}).get("past_present_share_buffer", False)),
            hidden_state_outputs=(),
            source_sha256=None,
        )
    raise ModelFolderError(f"{path}: neither sluice_model.json nor genai_config.json found")
