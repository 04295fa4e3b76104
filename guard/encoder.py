"""all-MiniLM-L6-v2 sentence features with onnxruntime + tokenizers (no torch).

The folder is built by `make encoder` (`tools/export_encoder.py`): model.onnx, tokenizer.json, manifest.json.
Texts longer than the encoder's window are split into overlapping windows, one vector each, so nothing
past a truncation point goes unjudged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from guard.features import FeatureBatch, FloatArray, IntArray

FEATURE_NAME = "minilm-l6-v2/mean-l2"
# Overlap between windows of a long text: a phrase cut at a window edge is still seen whole by one window.
WINDOW_OVERLAP = 32
# Rows per onnxruntime call: bounds the padded (batch, seq, seq) attention buffers.
MAX_BATCH_ROWS = 32
# An int8 encoder (tools/encoder_int8.py) quantizes activations with one scale per tensor, taken from the
# whole batch, padding included: a window's vector would depend on its batch mates. So it runs one window
# per call, unpadded, and a text's verdict is the same alone or among other turns (and in training).
INT8_BATCH_ROWS = 1
# onnxruntime fuses each residual Add + LayerNormalization into one SkipLayerNormalization kernel, which took
# 30% of an int8 encoder call on this machine (onnxruntime 1.32, AVX-512). Left unfused: 17% less encoder
# time on 1,155 dev-split windows; float32 vectors unchanged (cosine 1.00000), int8 vectors as close to
# float32 as before (median cosine 0.9927 either way). Every session over an encoder folder uses this.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


class MiniLMEncoder:
    """A `FeatureExtractor` over the exported MiniLM folder.

    Args:
        folder: the `make encoder` output (model.onnx, tokenizer.json, manifest.json).
        threads: onnxruntime intra-op threads; small by default because the generator owns the cores.
    """

    def __init__(self, folder: Path, threads: int = 1) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        self._max_tokens = int(manifest["max_tokens"])
        self._dim = int(manifest["hidden_size"])
        # an encoder exported with a fine-tuning adapter is a different feature space (manifest says which)
        self._name = str(manifest.get("feature_name", FEATURE_NAME))
        self._batch_rows = INT8_BATCH_ROWS if manifest.get("weights") == "int8" else MAX_BATCH_ROWS
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # the file pads/truncates to 128; windows and padding are done here instead
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        cls_id = self._tokenizer.token_to_id("[CLS]")
        sep_id = self._tokenizer.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{folder}/tokenizer.json lacks [CLS]/[SEP]")
        self._cls, self._sep = cls_id, sep_id
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # with several threads, idle workers sleep instead of spinning on cores the generator needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                             providers=["CPUExecutionProvider"],
                                             disabled_optimizers=list(DISABLED_OPTIMIZERS))

    @property
    def name(self) -> str:
        """The feature space id recorded in heads trained on these vectors."""
        return self._name

    @property
    def dim(self) -> int:
        """Embedding width (384)."""
        return self._dim

    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token windows, each wrapped in [CLS] ... [SEP], and the text index owning each.

        Args:
            texts: the texts to split.

        Returns:
            (windows, owners), at least one window per text (an empty text gives [CLS] [SEP]).
        """
        body = self._max_tokens - 2
        stride = body - WINDOW_OVERLAP
        windows: list[list[int]] = []
        owners: list[int] = []
        for index, enc in enumerate(self._tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = enc.ids
            start = 0
            while True:
                windows.append([self._cls, *ids[start : start + body], self._sep])
                owners.append(index)
                if start + body >= len(ids):
                    break
                start += stride
        return windows, owners

    def encode_windows(self, windows: Sequence[Sequence[int]]) -> FloatArray:
        """Run the encoder on token windows, batched by similar length to limit padding (int8: one per call).

        Args:
            windows: token id lists, each at most the encoder's window.

        Returns:
            (len(windows), dim) L2-normalised mean-pooled embeddings.
        """
        out = np.zeros((len(windows), self._dim), dtype=np.float32)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        for lo in range(0, len(order), self._batch_rows):
            rows = order[lo : lo + self._batch_rows]
            width = max(len(windows[i]) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)  # (batch, seq), 0 = [PAD]
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, : len(windows[i])] = windows[i]
                mask[r, : len(windows[i])] = 1
            (emb,) = self._session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
            out[rows] = emb
        return out

    def extract(self, texts: Sequence[str]) -> FeatureBatch:
        """Featurise texts (blocking; run it in a worker thread).

        Args:
            texts: the texts.

        Returns:
            One row per window, owners mapping rows to texts.
        """
        windows, owners = self.windows(texts)
        owner_arr: IntArray = np.asarray(owners, dtype=np.int64)
        return FeatureBatch(self.encode_windows(windows), owner_arr, len(texts))
