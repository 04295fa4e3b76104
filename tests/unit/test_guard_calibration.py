"""tools/guard_calibration.py: out-of-fold scores from per-fold fine-tuned encoders (fake encoders here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guard.features import FeatureBatch
from tools import guard_calibration
from tools.guard_data import Example, fold_of
from tools.train_guard import TrainConfig


class FakeEncoder:
    """Stands in for MiniLMEncoder(folder): 2-d features, unsafe rows near +1, safe near -1."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.name = f"fake/{folder.name}"
        self.dim = 2

    def extract(self, texts: list[str]) -> FeatureBatch:
        raise AssertionError("featurize is patched")


def _fold_folder(tmp_path: Path, k: int, n: int, **extra: object) -> Path:
    folder = tmp_path / f"enc{k}"
    folder.mkdir()
    adapter = tmp_path / f"fold{k}.npz"
    adapter.with_suffix(".json").write_text(json.dumps({"fold": k, "folds": n, "holdout": [], **extra}))
    (folder / "manifest.json").write_text(json.dumps({"adapter": str(adapter)}))
    return folder


@pytest.fixture
def rows() -> list[Example]:
    out = [Example(f"text {i}", i % 3 == 0, ("S1",) if i % 3 == 0 else (), source="self_instruct" if i % 2 else "B",
                   split="dev" if i % 7 == 0 else "train") for i in range(150)]
    return [*out, Example("never trained", False, source="alpaca", shippable=False, split="dev")]


def test_every_train_row_is_scored_once_by_a_fold_that_never_saw_it(
        tmp_path: Path, rows: list[Example], monkeypatch: pytest.MonkeyPatch) -> None:
    import guard.encoder

    rng = np.random.default_rng(0)
    featurized: dict[str, list[str]] = {}

    def fake_featurize(examples: list[Example], extractor: FakeEncoder) -> list[np.ndarray]:
        featurized[extractor.name] = [ex.text for ex in examples]
        return [(rng.normal(size=(1, 2)) * 0.3 + (1.0 if ex.unsafe else -1.0)).astype(np.float32) for ex in examples]

    trained_on: list[set[str]] = []
    real_train = guard_calibration.train

    def spy_train(examples: list[Example], *args: object) -> object:
        trained_on.append({ex.text for ex in examples})
        return real_train(examples, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(guard.encoder, "MiniLMEncoder", FakeEncoder)
    monkeypatch.setattr(guard_calibration, "featurize", fake_featurize)
    monkeypatch.setattr(guard_calibration, "train", spy_train)
    folders = [_fold_folder(tmp_path, k, 3) for k in (2, 0, 1)]  # any order
    scored, scores = guard_calibration.kfold_scores(rows, folders, TrainConfig(epochs=30))
    train_texts = [ex.text for ex in rows if ex.shippable and ex.split == "train"]
    assert sorted(ex.text for ex in scored) == sorted(train_texts)  # each train row once; no dev, no alpaca
    assert scores.shape == (len(scored), 15)
    for k, texts in zip((2, 0, 1), trained_on, strict=True):  # fold k's head never trains on fold k
        assert texts and all(fold_of(t, 3) != k for t in texts)
    assert all(sorted(v) == sorted(train_texts) for v in featurized.values())
    labels = np.array([ex.unsafe for ex in scored])
    assert scores[labels, 0].mean() > scores[~labels, 0].mean()


@pytest.mark.parametrize("extra", [{"include_dev": True}, {"holdout": ["harmbench"]}])
def test_rejects_adapters_that_do_not_fit_the_protocol(tmp_path: Path, rows: list[Example],
                                                       extra: dict[str, object]) -> None:
    folders = [_fold_folder(tmp_path, 0, 2, **extra), _fold_folder(tmp_path, 1, 2)]
    with pytest.raises(ValueError, match="does not fit"):
        guard_calibration.kfold_scores(rows, folders, TrainConfig(epochs=5))


def test_rejects_a_missing_or_repeated_fold(tmp_path: Path, rows: list[Example]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folders = [_fold_folder(tmp_path / "a", 0, 3), _fold_folder(tmp_path / "b", 0, 3)]
    with pytest.raises(ValueError, match="does not fit"):
        guard_calibration.kfold_scores(rows, folders, TrainConfig(epochs=5))


def test_union_holdout_folds_score_only_the_rows_left_in(tmp_path: Path, rows: list[Example],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import guard.encoder

    def fake_featurize(examples: list[Example], extractor: FakeEncoder) -> list[np.ndarray]:
        return [np.full((1, 2), 1.0 if ex.unsafe else -1.0, np.float32) for ex in examples]

    monkeypatch.setattr(guard.encoder, "MiniLMEncoder", FakeEncoder)
    monkeypatch.setattr(guard_calibration, "featurize", fake_featurize)
    folders = [_fold_folder(tmp_path, k, 2, holdout=["B"]) for k in (0, 1)]
    scored, _ = guard_calibration.kfold_scores(rows, folders, TrainConfig(epochs=5), holdout=("B",))
    assert scored and {ex.source for ex in scored} == {"self_instruct"}  # the held-out source is never scored
    with pytest.raises(ValueError, match="does not fit"):  # adapters must have left out exactly that holdout
        guard_calibration.kfold_scores(rows, folders, TrainConfig(epochs=5), holdout=("B", "C"))
