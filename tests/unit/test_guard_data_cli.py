"""`python -m tools.guard_data --split ...`: which rows each split writes (the loader is replaced by given rows,
so no shared data is read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import guard_data
from tools.guard_data import Example


def rows_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str) -> list[str]:
    examples = [Example("an alpaca row", False, source="alpaca", split="dev"),
                Example("a malicious_instruct row", True, ("S2",), source="malicious_instruct", split="dev"),
                Example("a dev row", False, source="self_instruct", split="dev"),
                Example("a train row", True, ("S1",), source="harmbench", split="train")]
    monkeypatch.setattr(guard_data, "load_all", lambda root, own: examples)
    out = tmp_path / "rows.jsonl"
    assert guard_data.main(["--split", split, "--out", str(out)]) == 0
    return [json.loads(line)["text"] for line in out.read_text().splitlines()]


def test_unseen_split_is_the_measure_only_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bench.guard_false_blocks' default prompts: rows no head trains on
    assert rows_written(tmp_path, monkeypatch, "unseen") == ["an alpaca row", "a malicious_instruct row"]


@pytest.mark.parametrize(("split", "want"), [("dev", 3), ("train", 1), ("all", 4)])
def test_other_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str, want: int) -> None:
    assert len(rows_written(tmp_path, monkeypatch, split)) == want
