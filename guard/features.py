"""Feature extraction for the embedded classifier: text in, fixed-size vectors out.

Two feature sources are planned (issue 5, "an embedded classifier"):
  (b) a small sentence encoder (all-MiniLM-L6-v2, `guard/encoder.py`), built now;
  (a) the served model's own hidden states from the generation pass, which arrive as vectors from the
      engine rather than from text. Such a source implements the same protocol (or hands a
      `FeatureBatch` straight to `ClassifierModerator.judge_features`), and a head trained on it names
      the same `name` in its metadata, so a head is never applied to the wrong features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Vectors for a batch of texts. A long text may give several vectors (one per window).

    Args:
        vectors: (rows, dim) float32 features.
        owners: (rows,) index of the text each row belongs to; every text owns at least one row.
        count: number of texts in the batch.
    """

    vectors: FloatArray
    owners: IntArray
    count: int

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.owners.shape != (self.vectors.shape[0],):
            raise ValueError(f"vectors (rows, dim) and owners (rows,) disagree: "
                             f"{self.vectors.shape} vs {self.owners.shape}")
        if self.count and set(np.unique(self.owners).tolist()) != set(range(self.count)):
            raise ValueError(f"every one of the {self.count} texts must own at least one row")


class FeatureExtractor(Protocol):
    """Turns texts into feature vectors. Blocking (CPU-bound): callers run it off the event loop."""

    @property
    def name(self) -> str:
        """Identifies the feature space, e.g. "minilm-l6-v2/mean-l2"; a head records the one it was trained on."""
        ...

    @property
    def dim(self) -> int:
        """Width of each vector."""
        ...

    def extract(self, texts: Sequence[str]) -> FeatureBatch:
        """Featurise `texts` (blocking).

        Args:
            texts: the texts to featurise, any length.

        Returns:
            A batch whose `owners` map rows back to `texts`.
        """
        ...


@runtime_checkable
class WindowedExtractor(FeatureExtractor, Protocol):
    """An extractor whose work splits into token windows, so a long text can be encoded a slice at a time
    (`ClassifierModerator` then lets other queued checks run between the slices of a long one)."""

    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Tokenize `texts` into windows (blocking).

        Returns:
            (windows, owners): token id lists, each at most the encoder's window, and the text owning each.
        """
        ...

    def encode_windows(self, windows: Sequence[Sequence[int]]) -> FloatArray:
        """Encode windows (blocking).

        Returns:
            (len(windows), dim) vectors, in order.
        """
        ...


def max_per_owner(values: FloatArray, owners: IntArray, count: int) -> FloatArray:
    """Reduce per-row scores to per-text scores by the maximum (a text is as unsafe as its worst window).

    Args:
        values: (rows,) or (rows, k) scores.
        owners: (rows,) text index of each row.
        count: number of texts.

    Returns:
        (count,) or (count, k) maxima.
    """
    out = np.full((count, *values.shape[1:]), -np.inf, dtype=np.float32)
    np.maximum.at(out, owners, values)
    return out
