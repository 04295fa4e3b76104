"""Runs a converted model folder with plain `session.run` numpy feeds, independently of the engine.

The exported graph returns logits for the last position only (batch, 1, vocab), so per-position logits
come from feeding tokens one at a time through the KV cache (past of shape (batch, kv_heads, 0, head_dim)
to start, then each step's present).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

# The machine is shared: two intra-op threads are what a test may use.
THREADS = 2


class OnnxDecoder:
    """One sequence batch at a time; `feed` appends tokens and returns every output of that step."""

    def __init__(self, folder: Path, threads: int = THREADS) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        config = json.loads((folder / "sluice_model.json").read_text())["config"]
        self.layers = int(config["num_layers"])
        self.kv_heads = int(config["num_kv_heads"])
        self.head_dim = int(config["head_dim"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past: dict[str, np.ndarray] = {}
        self.length = 0
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Empties the KV cache for `batch` rows."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)  # (batch, kv_heads, 0, head_dim)
        self.past = {f"past_key_values.{i}.{kind}": empty for i in range(self.layers) for kind in ("key", "value")}
        self.length = 0

    def feed(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """ids: (batch, seq) int64 appended after the cache. Returns outputs by name (logits (batch, 1, vocab))."""
        batch, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, self.length + seq), np.int64), **self.past}
        out = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        self.past = {f"past_key_values.{name[len('present.'):]}": v for name, v in out.items()
                     if name.startswith("present.")}
        self.length += seq
        return out

    def stepwise_logits(self, ids: list[int], prefill: int = 1) -> np.ndarray:
        """(len(ids) - prefill + 1, vocab): logits after ids[:prefill], then after each further token."""
        self.reset()
        rows = [self.feed(np.asarray([ids[:prefill]]))["logits"][0, -1]]
        rows += [self.feed(np.asarray([[t]]))["logits"][0, -1] for t in ids[prefill:]]
        return np.stack(rows)

    def greedy(self, prompt: list[int], max_new: int, eos_ids: set[int]) -> list[int]:
        """Greedy continuation of `prompt` (prefilled in one call), stopping after an EOS id."""
        self.reset()
        logits = self.feed(np.asarray([prompt]))["logits"][0, -1]
        out: list[int] = []
        while len(out) < max_new:
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos_ids:
                break
            logits = self.feed(np.asarray([[token]]))["logits"][0, -1]
        return out

    def teacher_forced_top1(self, prompt: list[int], continuation: list[int]) -> list[int]:
        """The argmax at each continuation position when the reference continuation is fed back."""
        logits = self.stepwise_logits(prompt + continuation[:-1], prefill=len(prompt))
        return [int(i) for i in logits.argmax(-1)]
