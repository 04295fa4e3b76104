"""Our own guard data: data/guard/*.jsonl (trains the shipped head) and data/guard_eval/*.jsonl (never trained on;
written after the guard shipped then had been frozen, to measure it). Rows are well-formed, and no evaluation
row repeats a training row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = sorted((ROOT / "data" / "guard").glob("*.jsonl"))
EVAL = sorted((ROOT / "data" / "guard_eval").glob("*.jsonl"))
PAIRED = [p for p in EVAL if re.search(r"_round\d+$", p.stem)]  # contrast pairs; casual_ordinary.jsonl is all safe
CODES = {f"S{i}" for i in range(1, 15)}


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def norm(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


@pytest.mark.parametrize("path", TRAIN + EVAL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rows_are_well_formed(path: Path) -> None:
    data = rows(path)
    assert data
    for row in data:
        assert isinstance(row["text"], str) and row["text"].strip(), row
        assert row["label"] in ("safe", "unsafe"), row
        cats = row.get("categories", [])
        assert isinstance(cats, list) and set(cats) <= CODES, row
        assert bool(cats) == (row["label"] == "unsafe"), row  # unsafe rows name a category, safe rows none
        assert row.get("role", "User") in ("User", "Agent"), row


def test_evaluation_pairs_are_one_safe_and_one_unsafe() -> None:
    assert len(PAIRED) == 5, "data/guard_eval lacks its contrast pairs"
    for path in PAIRED:
        by_topic: dict[str, list[str]] = {}
        for row in rows(path):
            by_topic.setdefault(str(row["topic"]), []).append(str(row["label"]))
        assert all(sorted(labels) == ["safe", "unsafe"] for labels in by_topic.values()), path.name


def test_no_evaluation_row_repeats_a_training_row() -> None:
    train = {norm(row["text"]) for path in TRAIN for row in rows(path)}
    evaluation = [norm(row["text"]) for path in EVAL for row in rows(path)]
    assert len(set(evaluation)) == len(evaluation)
    assert not train & set(evaluation)
