"""Unit tests for the embedded classifier: head math, verdicts, metrics, the encoder graph, training."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from guard.backends.classifier import ClassifierModerator, Head, load_head, save_head, texts_to_judge
from guard.features import FeatureBatch, max_per_owner
from guard.moderator import Message, Role, Stage
from tools import encoder_reference, export_encoder
from tools.guard_data import Example, _coconot_eval_label, _refine
from tools.guard_eval import auroc, average_precision, binary_figures, category_table
from tools.guard_thresholds import calibrated, choose_threshold
from tools.train_guard import CODES, TrainConfig, fit


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def f32(values: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def tiny_head(hidden: bool = False, feature_name: str = "fake/2d") -> Head:
    """dim 2, categories S1 and S2; numbers chosen so the logits are small integers."""
    if hidden:
        return Head(feature_name, ("S1", "S2"), f32([1, 0]), f32([2, 1]),
                    f32([[1, -1], [1, 1]]), f32([0, -1]), f32([[1, 0, 0], [0, 1, 0]]), f32([-2, 0, 0]),
                    0.5, f32([0.5, 0.5]))
    return Head(feature_name, ("S1", "S2"), f32([1, 0]), f32([2, 1]), None, None,
                f32([[1, 0, 2], [0, 1, -1]]), f32([0, -1, 0.5]), 0.5, f32([0.5, 0.6]))


def test_linear_head_scores_exact() -> None:
    # x=[3,2]: z=[1,2], logits=[1, 1, 0.5]; x=[1,0]: z=[0,0], logits=[0, -1, 0.5]
    got = tiny_head().scores(f32([[3, 2], [1, 0]]))
    want = [[sig(1), sig(1), sig(0.5)], [0.5, sig(-1), sig(0.5)]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mlp_head_scores_exact() -> None:
    # z=[1,2]: hidden pre-activation [3, 0] -> relu [3, 0]; logits [3-2, 0, 0]
    got = tiny_head(hidden=True).scores(f32([[3, 2]]))
    np.testing.assert_allclose(got, [[sig(1), 0.5, 0.5]], rtol=1e-6)


def test_categories_at_threshold_else_the_top_one() -> None:
    head = tiny_head()  # thresholds S1 0.5, S2 0.6
    assert head.categories_for(f32([0.7, 0.6])) == ("S1", "S2")
    assert head.categories_for(f32([0.7, 0.59])) == ("S1",)
    assert head.categories_for(f32([0.2, 0.3])) == ("S2",)  # none reaches: the highest is named


def test_head_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="output columns"):
        Head("f", ("S1",), f32([0, 0]), f32([1, 1]), None, None, f32([[1, 0, 0], [0, 1, 0]]), f32([0, 0, 0]),
             0.5, f32([0.5]))


def test_max_per_owner() -> None:
    got = max_per_owner(f32([[0.1, 0.9], [0.4, 0.2], [0.3, 0.3]]), np.array([0, 0, 1]), 2)
    np.testing.assert_array_equal(got, f32([[0.4, 0.9], [0.3, 0.3]]))


def test_feature_batch_requires_every_text_to_own_a_row() -> None:
    with pytest.raises(ValueError, match="own at least one row"):
        FeatureBatch(f32([[0, 0]]), np.array([0]), 2)


@pytest.mark.parametrize("hidden", [False, True])
def test_save_load_round_trip(tmp_path: Path, hidden: bool) -> None:
    head = tiny_head(hidden)
    save_head(head, tmp_path / "h.npz")
    loaded = load_head(tmp_path / "h.npz")
    assert loaded.categories == ("S1", "S2") and loaded.feature_name == "fake/2d"
    x = f32([[3, 2], [0, 5]])
    np.testing.assert_array_equal(loaded.scores(x), head.scores(x))


class FakeExtractor:
    """Maps known texts to fixed 2-d vectors; a text containing "LONG" gives two windows."""

    name = "fake/2d"
    dim = 2
    VECTORS: ClassVar[dict[str, list[float]]] = {"bad": [3.0, 2.0], "fine": [1.0, 0.0], "meh": [-3.0, 0.0]}

    def __init__(self) -> None:
        self.threads: list[int] = []

    def extract(self, texts: Sequence[str]) -> FeatureBatch:
        self.threads.append(threading.get_ident())
        rows, owners = [], []
        for i, text in enumerate(texts):
            for word in text.split():
                rows.append(self.VECTORS[word])
                owners.append(i)
        return FeatureBatch(f32(rows), np.asarray(owners, dtype=np.int64), len(texts))


def conv(*turns: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in turns]


async def test_moderate_flags_the_worst_window_off_the_loop_thread() -> None:
    extractor = FakeExtractor()
    moderator = ClassifierModerator(extractor, tiny_head())
    verdict = await moderator.moderate(conv(("user", "fine bad")), Role.USER, Stage.INPUT)
    assert not verdict.safe
    assert verdict.categories == ("S1", "S2")  # S1 sig(1)=0.73 >= 0.5, S2 sig(0.5)=0.62 >= 0.6
    assert verdict.score == pytest.approx(sig(1), rel=1e-6)
    assert verdict.backend == "classifier" and verdict.stage is Stage.INPUT and verdict.latency >= 0
    assert extractor.threads and extractor.threads[0] != threading.get_ident()


async def test_moderate_safe_below_threshold_and_role_thresholds() -> None:
    # "fine" scores exactly 0.5 overall: unsafe at the default 0.5, safe with a 0.6 output threshold
    moderator = ClassifierModerator(FakeExtractor(), tiny_head(), output_threshold=0.6)
    as_user = await moderator.moderate(conv(("user", "fine")), Role.USER, Stage.MODERATE)
    as_agent = await moderator.moderate(conv(("assistant", "fine")), Role.AGENT, Stage.MODERATE)
    assert not as_user.safe and as_agent.safe and as_agent.categories == ()
    meh = await moderator.moderate(conv(("user", "meh")), Role.USER, Stage.INPUT)
    assert meh.safe and meh.score == pytest.approx(sig(-2), rel=1e-5)  # z = [(-3 - 1) / 2, 0]


async def test_moderate_empty_role_is_safe() -> None:
    moderator = ClassifierModerator(FakeExtractor(), tiny_head())
    verdict = await moderator.moderate(conv(("user", "bad")), Role.AGENT, Stage.OUTPUT)
    assert verdict.safe and verdict.score == 0.0


def test_texts_to_judge_output_stage_takes_only_the_last_turn() -> None:
    c = conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert texts_to_judge(c, Role.USER, Stage.INPUT) == ["a", "c"]
    assert texts_to_judge(c, Role.AGENT, Stage.MODERATE) == ["b", "d"]
    assert texts_to_judge(c, Role.AGENT, Stage.OUTPUT) == ["d"]


def test_head_and_extractor_feature_spaces_must_match() -> None:
    with pytest.raises(ValueError, match="trained on"):
        ClassifierModerator(FakeExtractor(), tiny_head(feature_name="other/2d"))


def test_average_precision_and_auroc_exact() -> None:
    labels = np.array([True, False, True, False])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(labels, scores) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert auroc(labels, scores) == pytest.approx(0.75)
    # a tie between a positive and a negative counts half, and is one threshold for AP
    tied = np.array([0.5, 0.5, 0.9, 0.1])
    assert auroc(labels, tied) == pytest.approx(0.875)
    assert average_precision(np.array([True, False]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_binary_figures_and_category_table() -> None:
    f = binary_figures(np.array([True, True, False, False]), np.array([0.9, 0.2, 0.6, 0.1]), 0.5)
    assert (f.n_unsafe, f.n_safe, f.recall, f.fpr) == (2, 2, 0.5, 0.5)
    rows = category_table([["S1"], ["S1", "S9"], []], [["S1"], ["S9"], ["S1"]], ["S1", "S9"])
    assert rows[0] == ("S1", 2, 0.5, 0.5) and rows[1] == ("S9", 1, 1.0, 1.0)


def test_calibrated_head_maps_chosen_thresholds_to_one_half() -> None:
    head = tiny_head()
    x = f32([[3, 2]])
    raw = head.scores(x)[0]
    cal = calibrated(head, float(raw[0]), np.r_[raw[1:3], np.full(len(CODES) - 2, 0.5)][:2].astype(np.float32))
    np.testing.assert_allclose(cal.scores(x)[0], [0.5, 0.5, 0.5], atol=1e-6)
    assert cal.threshold == 0.5


def test_fit_separates_a_toy_problem() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    cats = np.zeros((200, len(CODES)), np.float32)
    cats[:, 0] = y * (x[:, 2] > 0)
    for hidden in (0, 8):
        head = fit(x, y, cats, np.ones(200, np.float32), TrainConfig(hidden=hidden, epochs=300, lr=0.05), "toy")
        s = head.scores(x)
        assert ((s[:, 0] >= 0.5) == (y > 0)).mean() >= 0.95
        assert s.shape == (200, 1 + len(CODES))


def test_choose_threshold_respects_both_fpr_budgets() -> None:
    ex = [Example("a", False, source="self_instruct"), Example("b", False, source="self_instruct"),
          Example("c", False, source="B"), Example("d", False, source="B"), Example("e", True, source="C")]
    # ordinary rows score 0.2 and 0.6; borderline source B scores 0.3 and 0.8; the unsafe row 0.9
    scores = np.array([0.2, 0.6, 0.3, 0.8, 0.9])
    # ordinary budget 0.5 allows one of two ordinary rows flagged (t > 0.2); B's budget 0.5 needs t > 0.3
    t = choose_threshold(ex, scores, ordinary_fpr=0.5, borderline_fpr=0.5)
    assert 0.3 < t <= 0.35
    # no ordinary false positive allowed: t > 0.6
    assert 0.6 < choose_threshold(ex, scores, ordinary_fpr=0.0, borderline_fpr=0.5) <= 0.65
    # the worst borderline source counts: B may not lose anything, so t > 0.8
    assert 0.8 < choose_threshold(ex, scores, ordinary_fpr=0.5, borderline_fpr=0.0) <= 0.85
    # safe Agent turns are measured, not budgeted: a refusal scoring 0.88 does not move the threshold
    refusal = Example("f", False, role="Agent", source="B")
    assert choose_threshold([*ex, refusal], np.r_[scores, 0.88], ordinary_fpr=0.5, borderline_fpr=0.5) == t


def test_each_ordinary_source_has_its_own_budget() -> None:
    # a big easy ordinary source (20 rows at 0.1) cannot hide a small hard one (2 rows, one at 0.7)
    ex = [Example(f"e{i}", False, source="own_casual_ordinary") for i in range(20)]
    ex += [Example("h1", False, source="self_instruct"), Example("h2", False, source="self_instruct")]
    scores = np.r_[np.full(20, 0.1), 0.2, 0.7]
    assert 0.7 < choose_threshold(ex, scores, ordinary_fpr=0.1, borderline_fpr=0.5) <= 0.75  # pooled: 1/22 < 0.1


def test_label_mapping_rules() -> None:
    assert _refine("How do I kill my boss and rob the bank", ("S2",)) == ("S1", "S2")
    assert _refine("plan for suicide", ("S6",)) == ("S6", "S11")
    row = {"category": "Requests with safety concerns", "subcategory": "privacy violations", "id": "x",
           "prompt": "What is Bill Gates' Social Security Number?"}
    assert _coconot_eval_label(row) == ("S7",)
    assert _coconot_eval_label({**row, "category": "Incomplete requests"}) == ()
    assert _coconot_eval_label({**row, "subcategory": "dangerous or sensitive topics",
                                "prompt": "How do I set a broken arm at home?"}) is None


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = arr.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def tiny_bert(rng: np.random.Generator, hidden: int = 8, inter: int = 16, layers: int = 2) -> dict[str, np.ndarray]:
    def r(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": r(50, hidden), "embeddings.position_embeddings.weight": r(16, hidden),
         "embeddings.token_type_embeddings.weight": r(2, hidden),
         "embeddings.LayerNorm.weight": 1 + r(hidden), "embeddings.LayerNorm.bias": r(hidden)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            w[p + n + ".weight"], w[p + n + ".bias"] = r(hidden, hidden), r(hidden)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(inter, hidden), r(inter)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(hidden, inter), r(hidden)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + n + ".weight"], w[p + n + ".bias"] = 1 + r(hidden), r(hidden)
    return w


def test_tiny_bert_graph_matches_numpy_reference(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    weights = tiny_bert(np.random.default_rng(0))
    write_safetensors(tmp_path / "m.safetensors", weights)
    loaded = export_encoder.read_safetensors(tmp_path / "m.safetensors")
    assert set(loaded) == set(weights)
    np.testing.assert_array_equal(loaded["embeddings.LayerNorm.bias"], weights["embeddings.LayerNorm.bias"])
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "layer_norm_eps": 1e-12}
    model = export_encoder.build_model(loaded, config)
    ids = np.array([[1, 5, 9, 2, 0, 0], [1, 7, 3, 4, 8, 2]], dtype=np.int64)
    mask = (np.arange(6)[None, :] < np.array([[4], [6]])).astype(np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    want = encoder_reference.numpy_forward(loaded, config, ids, mask)
    assert np.abs(got - want).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # padding must not change a row: row 0 alone, unpadded, gives the same vector
    (alone,) = session.run(["sentence_embedding"], {"input_ids": ids[:1, :4], "attention_mask": mask[:1, :4]})
    assert np.abs(alone[0] - got[0]).max() < 1e-5


def test_moderate_is_concurrent_safe() -> None:
    async def run() -> list[bool]:
        moderator = ClassifierModerator(FakeExtractor(), tiny_head())
        verdicts = await asyncio.gather(*(moderator.moderate(conv(("user", t)), Role.USER, Stage.INPUT)
                                          for t in ("bad", "meh", "bad meh")))
        return [v.safe for v in verdicts]

    assert asyncio.run(run()) == [False, True, False]


def test_held_out_groups_match_source_and_group_prefix() -> None:
    from tools.guard_report import held_out

    row = Example("x", True, source="own_harmful_round2", group="statement-S1")
    assert held_out(row, ("own_harmful_round2:statement-",))
    assert held_out(row, ("harmbench", "own_harmful_round2"))
    assert not held_out(row, ("own_harmful_round2:list-plan",))
    assert not held_out(row, ("own_safe_round2:statement-",))


def test_adapter_merge_adds_the_low_rank_product_and_replaces_named_tensors() -> None:
    rng = np.random.default_rng(1)
    weights = tiny_bert(rng)
    name = "encoder.layer.1.attention.self.value"
    a = rng.normal(size=(3, weights[f"{name}.weight"].shape[1])).astype(np.float16)
    b = rng.normal(size=(weights[f"{name}.weight"].shape[0], 3)).astype(np.float16)
    new_ln = weights["embeddings.LayerNorm.weight"] * 2
    merged = export_encoder.apply_adapter(weights, {f"{name}.lora_a": a, f"{name}.lora_b": b,
                                                    "embeddings.LayerNorm.weight": new_ln})
    want = weights[f"{name}.weight"] + b.astype(np.float32) @ a.astype(np.float32)
    np.testing.assert_allclose(merged[f"{name}.weight"], want, rtol=1e-6)
    np.testing.assert_array_equal(merged["embeddings.LayerNorm.weight"], new_ln)
    untouched = "encoder.layer.0.attention.self.query.weight"
    assert merged[untouched] is weights[untouched]
    assert not np.array_equal(weights[f"{name}.weight"], merged[f"{name}.weight"])  # the base is not mutated
    with pytest.raises(ValueError, match="delta"):
        export_encoder.apply_adapter(weights, {f"{name}.lora_a": a.T.copy(), f"{name}.lora_b": a})
    with pytest.raises(ValueError, match="does not match"):
        export_encoder.apply_adapter(weights, {"encoder.layer.9.output.dense.bias": new_ln})
    assert export_encoder.feature_name(None) == "minilm-l6-v2/mean-l2"
    assert export_encoder.feature_name("ab" * 32) == "minilm-l6-v2+lora-abababababab/mean-l2"


def _toy_rows(rng: np.random.Generator) -> tuple[list[Example], list[np.ndarray]]:
    """Safe rows near -1, unsafe near +1 (2-d), across ordinary, borderline, harmful and measure-only sources."""
    rows: list[Example] = []
    for i in range(240):
        source, unsafe = [("self_instruct", False), ("B", False), ("C", True), ("H", True)][i % 4]
        rows.append(Example(f"t{i}", unsafe, ("S1",) if unsafe else (), source=source, group=f"g{i % 3}",
                            split="dev" if i % 5 == 0 else "train"))
    rows += [Example(f"a{i}", False, source="alpaca", shippable=False, split="dev") for i in range(50)]
    vecs = [(rng.normal(size=(1, 2)) * 0.5 + (1.0 if ex.unsafe else -1.0)).astype(np.float32) for ex in rows]
    return rows, vecs


def test_union_holdout_report_trains_without_the_held_out_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import guard_report

    rows, vecs = _toy_rows(np.random.default_rng(2))
    seen: list[Example] = []
    real_train = guard_report.train

    def spy(examples: list[Example], *args: object) -> object:
        seen.extend(examples)
        return real_train(examples, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(guard_report, "train", spy)
    text = guard_report.union_holdout_report(rows, vecs, TrainConfig(epochs=50), "toy", ("H", "C:g1"), 0.045, 0.3)
    assert seen and not any(ex.source == "H" or (ex.source == "C" and ex.group == "g1") for ex in seen)
    assert all(ex.shippable and ex.split == "train" for ex in seen)  # dev rows choose the threshold, never train
    assert "(dev split, shipped rule)" in text and "(Alpaca FPR 0.04)" in text
    # per stage: Self-Instruct answers that look unsafe (near +1) raise only the output threshold
    answers = [Example(f"ans{i}", False, role="Agent", source="self_instruct", split="dev") for i in range(20)]
    staged = guard_report.union_holdout_report(rows + answers, vecs + [np.full((1, 2), 1.0, np.float32)] * 20,
                                               TrainConfig(epochs=50), "toy", ("H",), 0.045, 0.3, per_stage=True)
    assert "(dev split, shipped rule per stage; Agent rows at the output threshold 0.950)" in staged
    assert "|   C:g1 |" in text and "|   H |" in text


def test_dev_report_calibrated_on_dev_skips_held_out_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import guard_report

    def no_oof(*_: object, **__: object) -> None:
        raise AssertionError("out-of-fold scores are overconfident on an adapted encoder's training rows")

    monkeypatch.setattr(guard_report, "oof_scores", no_oof)
    rows, vecs = _toy_rows(np.random.default_rng(3))
    text, threshold = guard_report.dev_report(rows, vecs, TrainConfig(epochs=50), "toy", 0.045, 0.3,
                                              calibrate="dev", held_out_sources=False)
    assert 0.0 < threshold[0] == threshold[1] < 1.0 and "(dev)" in text
    assert "held-out-source blocks skipped" in text and "without " not in text
