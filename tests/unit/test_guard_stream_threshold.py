"""The per-stream output threshold: choosing it (tools/guard_stream_threshold.py) and serving it
(Head.stream_offset, applied to Agent turns at the streamed output stage only)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.backends.classifier import ClassifierModerator, Head, load_head, save_head
from guard.moderator import Message, Role, Stage
from guard.stream import check_points
from tests.unit.test_classifier import FakeExtractor, f32, tiny_head
from tools.guard_stream_threshold import TOP, choose_stream_threshold, replay_checks, replay_guard, token_pieces


def sig_of(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_the_lowest_threshold_whose_streams_stop_no_more_than_whole_judgments_flag() -> None:
    # 10 safe answers: judged whole, 2 reach the output threshold 0.5; their streams' worst checks are higher
    whole = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.1, 0.2, 0.1, 0.3, 0.2])
    worst = np.array([0.55, 0.62, 0.3, 0.8, 0.9, 0.51, 0.2, 0.1, 0.64, 0.2])
    got = choose_stream_threshold(whole, worst, 0.5)
    assert got.whole_fpr == pytest.approx(0.2)
    assert got.stream_fpr_before == pytest.approx(0.6)  # 0.55, 0.62, 0.8, 0.9, 0.51, 0.64
    assert got.threshold == pytest.approx(0.645)  # 0.8 and 0.9 only: 2 of 10, as whole; 0.64 is the last below
    assert got.stream_fpr_after == pytest.approx(0.2)
    assert got.rows == 10 and got.output_threshold == 0.5


def test_never_below_the_output_threshold_and_capped() -> None:
    whole = np.array([0.6, 0.1])
    # streams stop no more often than whole answers are flagged already: keep the output threshold
    assert choose_stream_threshold(whole, np.array([0.6, 0.1]), 0.5).threshold == pytest.approx(0.5)
    # nothing on the grid reaches the target: the top of the grid
    assert choose_stream_threshold(np.array([0.1, 0.1]), np.array([0.99, 0.99]), 0.5).threshold == TOP
    with pytest.raises(ValueError):
        choose_stream_threshold(np.array([0.1]), np.array([0.1, 0.2]), 0.5)


def _with(head: Head, **fields: float) -> Head:
    return Head(**{**{k: getattr(head, k) for k in head.__dataclass_fields__}, **fields})


async def test_the_stream_offset_applies_to_agent_turns_at_the_output_stage_only() -> None:
    # "fine" scores exactly 0.5 raw; agent offset 0.1, stream offset 0.4
    moderator = ClassifierModerator(FakeExtractor(), _with(tiny_head(), agent_offset=0.1, stream_offset=0.4))
    as_user = await moderator.moderate([Message("user", "fine")], Role.USER, Stage.INPUT)
    streamed = await moderator.moderate([Message("assistant", "fine")], Role.AGENT, Stage.OUTPUT)
    whole = await moderator.moderate([Message("assistant", "fine")], Role.AGENT, Stage.MODERATE)
    assert as_user.score == pytest.approx(0.5)
    assert streamed.score == pytest.approx(sig_of(-0.5), rel=1e-6)
    assert whole.score == pytest.approx(sig_of(-0.1), rel=1e-6)  # a Moderate call is one whole judgment


def test_the_stream_offset_is_saved_and_an_older_head_loads_without_one(tmp_path: Path) -> None:
    save_head(_with(tiny_head(), stream_offset=0.75), tmp_path / "h.npz")
    assert load_head(tmp_path / "h.npz").stream_offset == pytest.approx(0.75)
    with np.load(tmp_path / "h.npz") as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k != "stream_offset"})
    old = load_head(tmp_path / "old.npz")
    scores = old.scores(f32([[3, 2]]))
    assert old.stream_offset == 0.0 and old.for_role(scores, Role.AGENT, Stage.OUTPUT) is scores


def test_serving_another_output_schedule_with_a_per_stream_threshold_is_warned() -> None:
    from service.guard_factory import stream_schedule_warning

    assert stream_schedule_warning(1.165, 4, 16, 512) is None  # the schedule the threshold was chosen for
    assert stream_schedule_warning(0.0, 4, 32, 512) is None  # a head without one reads the same anywhere
    warning = stream_schedule_warning(1.165, 4, 32, 512)
    assert warning is not None and "doubling to 16" in warning and "doubling to 32" in warning
    assert stream_schedule_warning(1.165, 4, 16, 1024) is not None


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(["ok ", "fine ", "bad ", "é", "", "worse ", "x"]), min_size=1, max_size=40),
       threshold=st.sampled_from([0.5, 0.7]), prefilter=st.sampled_from([0, 8]))
def test_replaying_through_the_stream_guard_agrees_with_the_worst_check(words: list[str], threshold: float,
                                                                          prefilter: int) -> None:
    """Without held flags, a stream stops exactly when its worst replayed check reaches the threshold; the
    guard's checks read what `replay_checks` reads (the bench and the threshold tool use both)."""
    async def score(text: str) -> float:  # unsafe words in the last 12 characters
        return 0.9 if "bad" in text[-12:] else 0.6 if "worse" in text else 0.0

    async def run() -> None:
        prefix = ["".join(words[:k]) for k in range(len(words) + 1)]
        points = check_points(len(words), 4, 1)
        worst, _ = await replay_checks(score, prefix.__getitem__, points, 20, prefilter, 0.002)
        stopped, _ = await replay_guard(score, words, 4, 1, 20, prefilter, 0.002, threshold, None)
        assert stopped == (worst >= threshold)

    asyncio.run(run())


async def test_held_flags_replay_a_lone_flag_as_cleared() -> None:
    async def score(text: str) -> float:  # flags a fragment, clears the longer text
        return 0.8 if text.endswith("bomb ") else 0.0

    words = ["I ", "won't ", "help ", "build ", "a ", "bomb ", "because ", "it ", "hurts ", "people ."]
    assert (await replay_guard(score, words, 16, 2, 512, 0, 0.002, 0.5, None))[0] is True
    assert (await replay_guard(score, words, 16, 2, 512, 0, 0.002, 0.5, 0.1))[0] is False


def test_token_pieces_concatenate_to_every_decoded_prefix() -> None:
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE({"a": 0, "\u00c3": 1, "\u00a9": 2, "\u0120b": 3}, []))
    tok.decoder = decoders.ByteLevel()
    ids = [0, 1, 2, 3]  # "a", then "é" split over two byte tokens, then " b"
    pieces = token_pieces(tok, ids)
    assert pieces == ["a", "", "é", " b"]
    assert "".join(pieces) == tok.decode(ids)
    # an answer cut inside a character ends with the replacement character, as a whole decode shows it
    assert token_pieces(tok, [0, 1]) == ["a", "\ufffd"] and tok.decode([0, 1]) == "a\ufffd"
