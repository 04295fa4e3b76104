"""One threshold per stage: choosing them (tools/guard_thresholds.py) and serving them (Head.agent_offset)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from guard.backends.classifier import ClassifierModerator, Head, load_head, save_head
from guard.moderator import Message, Role, Stage
from tests.unit.test_classifier import FakeExtractor, f32, tiny_head
from tools.guard_data import Example
from tools.guard_thresholds import (
    calibrated,
    choose_input_margin_thresholds,
    choose_stage_thresholds,
    choose_threshold,
    choose_thresholds,
    logit,
    stage_adjusted,
)


def _rows() -> tuple[list[Example], np.ndarray]:
    # Self-Instruct prompts (User) score 0.1 / 0.322, its reference answers (Agent) 0.2 / 0.722; a borderline
    # source's User prompts 0.2 / 0.4; refusals (Agent, borderline source) 0.9: measured, never budgeted
    ex = [Example("p1", False, source="self_instruct"), Example("p2", False, source="self_instruct"),
          Example("a1", False, role="Agent", source="self_instruct"),
          Example("a2", False, role="Agent", source="self_instruct"),
          Example("b1", False, source="B"), Example("b2", False, source="B"),
          Example("r1", False, role="Agent", source="B"), Example("u", True, source="C")]
    return ex, f32([0.1, 0.322, 0.2, 0.722, 0.2, 0.4, 0.9, 0.95])


def test_each_stage_is_budgeted_on_its_own_rows() -> None:
    ex, scores = _rows()
    t_in, t_out = choose_stage_thresholds(ex, scores, ordinary_fpr=0.0, borderline_fpr=0.5)
    assert 0.322 < t_in <= 0.325  # User prompts only: above Self-Instruct's 0.322 (B's budget allows one of two)
    assert 0.722 < t_out <= 0.725  # the answers' 0.722 binds only the output stage; the refusal's 0.9 is unbudgeted


def test_the_shipped_rule_is_one_threshold_for_both_stages() -> None:
    ex, scores = _rows()
    t = choose_threshold(ex, scores, 0.0, 0.5)
    assert choose_thresholds(ex, scores, 0.0, 0.5) == (t, t)
    assert 0.722 < t <= 0.725  # pooled, the reference answers set the input threshold too
    assert choose_thresholds(ex, scores, 0.0, 0.5, per_stage=True) == choose_stage_thresholds(ex, scores, 0.0, 0.5)
    head = tiny_head()
    assert calibrated(head, t, f32([0.5, 0.5]), output_threshold=t).agent_offset == 0.0


def test_a_stage_without_budgeted_rows_takes_the_others_threshold() -> None:
    ex, scores = _rows()
    users = [i for i, e in enumerate(ex) if e.role == "User"]
    t_in, t_out = choose_stage_thresholds([ex[i] for i in users], scores[users], 0.0, 0.5)
    assert t_in == t_out and 0.322 < t_in <= 0.325


def test_the_margin_rule_keeps_the_pooled_output_threshold_and_lowers_the_input_one() -> None:
    ex, scores = _rows()
    pooled = choose_threshold(ex, scores, 0.0, 0.5)
    # B's User prompts (0.2 / 0.4): budget 0.5 lets one through (input just above Self-Instruct's 0.322);
    # budget 0.0 (a wide margin) holds it above B's 0.4
    t_in, t_out = choose_input_margin_thresholds(ex, scores, 0.0, 0.5, input_borderline_fpr=0.5)
    assert t_out == pooled and 0.322 < t_in <= 0.325
    t_in, t_out = choose_input_margin_thresholds(ex, scores, 0.0, 0.5, input_borderline_fpr=0.0)
    assert t_out == pooled and 0.4 < t_in <= 0.405
    assert choose_thresholds(ex, scores, 0.0, 0.5, input_borderline_fpr=0.0) == (t_in, t_out)


def test_two_rules_for_the_input_threshold_are_refused() -> None:
    ex, scores = _rows()
    with pytest.raises(ValueError, match="per_stage and input_borderline_fpr"):
        choose_thresholds(ex, scores, 0.0, 0.5, per_stage=True, input_borderline_fpr=0.21)


def test_the_margin_rule_never_raises_the_input_threshold_above_the_pooled_one() -> None:
    ex, scores = _rows()
    scores = scores.copy()
    scores[5] = 0.99  # B's second prompt now beats every threshold: a zero budget cannot be met on User rows
    pooled = choose_threshold(ex, scores, 0.0, 0.5)
    assert choose_input_margin_thresholds(ex, scores, 0.0, 0.5, input_borderline_fpr=0.0) == (pooled, pooled)
    agents = [e for e in ex if e.role != "User"]
    only = choose_input_margin_thresholds(agents, scores[[2, 3, 6]], 0.0, 0.5, input_borderline_fpr=0.0)
    assert only[0] == only[1]  # no User rows: one threshold


def test_stage_adjusted_reads_agent_rows_at_the_output_threshold() -> None:
    ex, scores = _rows()
    t_in, t_out = 0.3, 0.8
    adj = stage_adjusted(ex, np.c_[scores, scores], logit(t_out) - logit(t_in))
    agent = np.array([e.role == "Agent" for e in ex])
    np.testing.assert_array_equal(adj[~agent, 0], scores[~agent])  # User rows untouched
    np.testing.assert_array_equal(adj[:, 1], scores)  # category columns untouched
    assert ((adj[agent, 0] >= t_in) == (scores[agent] >= t_out)).all()
    assert adj[agent, 0] == pytest.approx([sig_of(logit(s) - logit(0.8) + logit(0.3)) for s in scores[agent]])


def sig_of(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_calibrated_head_maps_each_stage_threshold_to_one_half(tmp_path: Path) -> None:
    head = tiny_head()
    x = f32([[3, 2]])
    raw = float(head.scores(x)[0, 0])  # sig(1)
    t_in, t_out = sig_of(0.25), raw  # the input threshold below this text's score, the output one at it
    cal = calibrated(head, t_in, f32([0.5, 0.5]), output_threshold=t_out)
    assert cal.agent_offset == pytest.approx(1.0 - 0.25)
    user = cal.for_role(cal.scores(x), Role.USER)
    agent = cal.for_role(cal.scores(x), Role.AGENT)
    assert user[0, 0] == pytest.approx(sig_of(1.0 - 0.25), rel=1e-6) and agent[0, 0] == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_array_equal(agent[:, 1:], user[:, 1:])
    save_head(cal, tmp_path / "h.npz")
    assert load_head(tmp_path / "h.npz").agent_offset == pytest.approx(cal.agent_offset)


def test_a_head_file_without_an_offset_loads_with_zero(tmp_path: Path) -> None:
    save_head(tiny_head(), tmp_path / "h.npz")
    with np.load(tmp_path / "h.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "agent_offset"}
    np.savez(tmp_path / "old.npz", **arrays)  # as written before per-stage thresholds
    old: Head = load_head(tmp_path / "old.npz")
    assert old.agent_offset == 0.0
    scores = old.scores(f32([[3, 2]]))
    assert old.for_role(scores, Role.AGENT) is scores


async def test_moderator_judges_agent_turns_at_the_output_threshold() -> None:
    # "fine" scores exactly 0.5 raw: unsafe as a User turn; an offset of 0.1 makes it 0.475 as an Agent turn
    head = tiny_head()
    shifted = Head(**{**{k: getattr(head, k) for k in head.__dataclass_fields__}, "agent_offset": 0.1})
    moderator = ClassifierModerator(FakeExtractor(), shifted)
    as_user = await moderator.moderate([Message("user", "fine")], Role.USER, Stage.INPUT)
    as_agent = await moderator.moderate([Message("assistant", "fine")], Role.AGENT, Stage.OUTPUT)
    moderated = await moderator.moderate([Message("assistant", "fine")], Role.AGENT, Stage.MODERATE)
    assert not as_user.safe and as_user.score == pytest.approx(0.5)
    assert as_agent.safe and as_agent.score == pytest.approx(sig_of(-0.1), rel=1e-6)
    assert moderated.score == as_agent.score  # Moderate reads an Agent turn like the output stage


@pytest.mark.parametrize("tool", ["train_guard", "guard_report"])
def test_the_cli_refuses_two_threshold_rules_at_once(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    main = importlib.import_module(f"tools.{tool}").main
    with pytest.raises(SystemExit) as exc:
        main(["--encoder", "nowhere", "--holdout", "x", "--stage-thresholds", "--input-borderline-fpr", "0.21"]
             if tool == "guard_report" else ["--stage-thresholds", "--input-borderline-fpr", "0.21"])
    assert exc.value.code == 2 and "pick one" in capsys.readouterr().err


def test_head_options_override_the_shipped_head_settings_by_field_type() -> None:
    from tools.guard_report import head_config
    from tools.train_guard import TrainConfig

    assert head_config([]) == TrainConfig()
    cfg = head_config(["l2=3e-3", "hidden=0", "seed=2"])
    assert (cfg.l2, cfg.hidden, cfg.seed) == (3e-3, 0, 2) and isinstance(cfg.hidden, int)
    assert cfg.epochs == TrainConfig().epochs  # untouched fields keep the shipped value
    for bad, says in (("width=64", "expected name=value"), ("l2", "expected name=value"),
                      ("hidden=1.5", "is not a valid int")):
        with pytest.raises(ValueError, match=says):
            head_config([bad])


def test_the_report_cli_names_a_bad_head_option(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.guard_report import main

    with pytest.raises(SystemExit) as exc:
        main(["--encoder", "nowhere", "--holdout", "x", "--head-option", "depth=3"])
    assert exc.value.code == 2 and "head option 'depth=3'" in capsys.readouterr().err
