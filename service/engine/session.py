"""The onnxruntime session: providers, threads, I/O names, and IOBinding over the external KV cache.

This is the only module that knows the tensor names `past_key_values.%d.key|value` / `present.%d.key|value`
and their layout (batch, kv_heads, seq, head_dim).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.engine.kv_cache import KVCache, KVLayout

log = logging.getLogger(__name__)

PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.key$")
_ORT_DTYPES: dict[str, np.dtype[np.generic]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
}


@dataclass(frozen=True, slots=True)
class SessionOptions:
    intra_op_threads: int = 0  # 0 = the cores this process may use
    graph_optimization: str = "all"  # all | extended | basic | disabled
    profile_prefix: str | None = None  # enables onnxruntime profiling into files with this prefix


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware on Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class DecoderSession:
    """One decoder model: runs forwards with IOBinding on slot ranges of a KVCache."""

    def __init__(self, onnx_path: Path, opts: SessionOptions) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.intra_op_threads or usable_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = _OPT_LEVELS[opts.graph_optimization]
        if opts.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = opts.profile_prefix
        # Spinning keeps decode latency low (turning it off cost ~25% here); the engine thread is the only
        # caller, so spinning threads don't compete with other sessions of ours.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.threads = so.intra_op_num_threads
        inputs = {i.name: i for i in self.session.get_inputs()}
        layers = sorted(int(m.group(1)) for n in inputs if (m := _PAST_RE.match(n)))
        if not layers or layers != list(range(len(layers))):
            raise ValueError(f"{onnx_path}: no past_key_values.<i>.key inputs numbered from 0")
        shape = inputs[PAST_KEY.format(0)].shape  # (batch, kv_heads, past_seq, head_dim)
        if not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ValueError(f"{onnx_path}: KV heads / head size must be static, got {shape}")
        dtype = _ORT_DTYPES.get(inputs[PAST_KEY.format(0)].type)
        if dtype is None:
            raise ValueError(f"unsupported KV dtype {inputs[PAST_KEY.format(0)].type}")
        self.num_layers = len(layers)
        self.kv_heads = int(shape[1])
        self.head_dim = int(shape[3])
        self.kv_dtype = dtype
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.vocab_size = int(outputs["logits"].shape[-1])
        # Our exports emit only the last position; genai exports emit every position.
        self.logits_last_only = outputs["logits"].shape[1] == 1
        self.hidden_outputs = tuple(n for n in outputs if n.startswith("hidden_states."))
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._output_names = ["logits"] + [n.format(i) for i in range(self.num_layers)
                                           for n in (PRESENT_KEY, PRESENT_VALUE)]
        # Set by the engine from the model folder: whether past and present may share one buffer.
        self.shared_kv = True

    def kv_layout(self, slots: int, capacity: int) -> KVLayout:
        return KVLayout(self.num_layers, self.kv_heads, self.head_dim, self.kv_dtype, slots, capacity)

    def _binding(self, kv: KVCache, start: int, stop: int) -> ort.IOBinding:
        """IOBinding with KV rows [start, stop) bound as both past and present (no copy per step)."""
        key = (start, stop)
        io = self._bindings.get(key)
        if io is None:
            io = self.session.io_binding()
            for i in range(self.num_layers):
                for name_in, name_out, buf in ((PAST_KEY, PRESENT_KEY, kv.keys[i]),
                                               (PAST_VALUE, PRESENT_VALUE, kv.values[i])):
                    view = ort.OrtValue.ortvalue_from_numpy(buf[start:stop])  # shares memory
                    io.bind_ortvalue_input(name_in.format(i), view)
                    io.bind_ortvalue_output(name_out.format(i), view)
            self._bindings[key] = io
        return io

    def forward(self, kv: KVCache, start: int, input_ids: np.ndarray, attention_mask: np.ndarray,
                logits_out: np.ndarray) -> None:
        """Runs rows [start, start + batch) of the cache.

        Args:
            kv: the cache; rows are written in place at each row's offset (GroupQueryAttention).
            start: first slot of the batch.
            input_ids: (batch, seq) int64.
            attention_mask: (batch, total) int64, ones over each row's valid positions (right padded).
            logits_out: (batch, 1, vocab) float32 C-contiguous buffer receiving the last position's logits.
        """
        batch, seq = input_ids.shape
        if not self.shared_kv:
            self._forward_copying(kv, start, input_ids, attention_mask, logits_out)
            return
        io = self._binding(kv, start, start + batch)
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        target = logits_out
        if not self.logits_last_only and seq > 1:
            # genai-style exports return every position: (batch, seq, vocab) scratch, keep the last row.
            target = np.empty((batch, seq, self.vocab_size), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(target.shape), target.ctypes.data)
        self.session.run_with_iobinding(io)
        if target is not logits_out:
            logits_out[:] = target[:, -1:]

    def _forward_copying(self, kv: KVCache, start: int, input_ids: np.ndarray, attention_mask: np.ndarray,
                         logits_out: np.ndarray) -> None:
        """Fallback for graphs whose present is a new (past + seq) tensor: one row at a time, the row's
        valid past copied in and the new positions copied back into the slot buffers. Correct for any
        such graph with our I/O names; slower (copies, no batching)."""
        seq = input_ids.shape[1]
        for b in range(input_ids.shape[0]):
            slot = start + b
            past_len = int(attention_mask[b].sum()) - seq
            feeds: dict[str, np.ndarray] = {
                "input_ids": input_ids[b : b + 1],  # (1, seq)
                "attention_mask": np.ones((1, past_len + seq), np.int64),  # (1, total)
            }
            for i in range(self.num_layers):
                # (1, kv_heads, past_len, head_dim) copies of the row's valid positions
                feeds[PAST_KEY.format(i)] = np.ascontiguousarray(kv.keys[i][slot : slot + 1, :, :past_len])
                feeds[PAST_VALUE.format(i)] = np.ascontiguousarray(kv.values[i][slot : slot + 1, :, :past_len])
            out = dict(zip(self._output_names, self.session.run(self._output_names, feeds), strict=True))
            for i in range(self.num_layers):
                # present: (1, kv_heads, past_len + seq, head_dim); keep only the new positions
                kv.keys[i][slot, :, past_len : past_len + seq] = out[PRESENT_KEY.format(i)][0, :, past_len:]
                kv.values[i][slot, :, past_len : past_len + seq] = out[PRESENT_VALUE.format(i)][0, :, past_len:]
            logits_out[b] = out["logits"][0, -1:]

    def end_profiling(self) -> str | None:
        try:
            return str(self.session.end_profiling())
        except Exception:  # profiling was not enabled
            return None
