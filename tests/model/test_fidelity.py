"""Fidelity of the converted embedded model against an outside reference.

`tests/fixtures/greedy_fp32.json` is a copy of the shared reference `greedy_fp32.json`: the same GGUF
weights dequantized to float32 and decoded greedily by an independent runtime (transformers + torch; its
"source" field says so). The first-token margins there are tiny (0.01-0.08 logits on two prompts), so
quantized exports are judged by teacher-forced top-1 agreement along the reference text, not by
free-running greedy text (whose common prefix is printed for the record only).
"""

from __future__ import annotations

import json
from itertools import takewhile
from pathlib import Path
from typing import Any

import pytest

from tests.model.onnx_decoder import OnnxDecoder

REFERENCE: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "greedy_fp32.json").read_text(encoding="utf-8")
)
CASES: list[dict[str, Any]] = REFERENCE["cases"]
GREEDY_PREFIX = 16  # issue #2: the fp32 export reproduces at least the first 16 reference tokens
INT4_MIN_AGREEMENT = 0.95  # issue #2 target for the default export
# int8 at accuracy_level 4 measured 0.903 (65/72): its 8-bit MatMulNBits kernel rounds activations
# differently from the 4-bit one; a floor well above the genai builder's int4 (0.64-0.75) catches a
# broken mapping without pinning the exact figure.
INT8_MIN_AGREEMENT = 0.85


def _eos_ids(folder: Path) -> set[int]:
    return set(json.loads((folder / "sluice_model.json").read_text())["tokens"]["eos_token_ids"])


def _prefix(a: list[int], b: list[int]) -> int:
    return sum(1 for _ in takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False)))


def _agreement(folder: Path) -> tuple[float, str]:
    """Teacher-forced top-1 agreement over all cases, and a per-case summary for the report (with the
    common prefix of free-running greedy text, which near-ties can end at the first token)."""
    decoder = OnnxDecoder(folder)
    hits = total = 0
    parts = []
    for case in CASES:
        reference = case["greedy_ids"]
        predicted = decoder.teacher_forced_top1(case["prompt_ids"], reference)
        case_hits = sum(p == r for p, r in zip(predicted, reference, strict=True))
        hits, total = hits + case_hits, total + len(predicted)
        free = decoder.greedy(case["prompt_ids"], len(reference), _eos_ids(folder))
        parts.append(f"{case['name']} {case_hits}/{len(predicted)}, greedy prefix {_prefix(free, reference)}")
    return hits / total, f"{hits}/{total} ({'; '.join(parts)})"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fp32_greedy_reproduces_reference(model_dir_fp32: Path, case: dict[str, Any]) -> None:
    reference = case["greedy_ids"]
    want = min(GREEDY_PREFIX, len(reference))  # P1's reference ends with EOS after 8 tokens
    got = OnnxDecoder(model_dir_fp32).greedy(case["prompt_ids"], want, _eos_ids(model_dir_fp32))
    assert got == reference[:want], f"common prefix {_prefix(got, reference)} of {want}"


def test_int4_teacher_forced_agreement(model_dir: Path) -> None:
    rate, summary = _agreement(model_dir)
    print(f"int4 teacher-forced top-1 agreement with the fp32 reference: {rate:.3f} = {summary}")
    assert rate >= INT4_MIN_AGREEMENT, summary


def test_int8_teacher_forced_agreement(model_dir_int8: Path) -> None:
    rate, summary = _agreement(model_dir_int8)
    print(f"int8 teacher-forced top-1 agreement with the fp32 reference: {rate:.3f} = {summary}")
    assert rate >= INT8_MIN_AGREEMENT, summary
