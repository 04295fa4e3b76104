"""Policy: validation, tighten-never-loosen, decisions, fail-open / fail-closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from guard.failsafe import FailSafeModerator
from guard.moderator import Message, Role, Stage, Verdict
from guard.policy import TIMEOUT_CHARS, Policy, PolicyError, PolicyOptions
from guard.prompt import ConversationError
from guard.taxonomy import BUILTIN_CODES, custom_categories

GAMBLING = custom_categories([("Gambling", "No betting help.")])  # S15
BASE = Policy(excluded=("S6",), custom=GAMBLING, input_threshold=0.5, output_threshold=0.6)
USER_TURN = (Message("user", "hello"),)


def test_defaults() -> None:
    policy = Policy()
    assert [c.code for c in policy.categories] == list(BUILTIN_CODES)
    assert policy.fail_open is False  # fail closed by default
    assert policy.input_threshold == policy.output_threshold == 0.5


def test_first_window_is_capped_at_the_window() -> None:
    assert Policy(release_window_tokens=16, first_release_window_tokens=4).first_window_tokens == 4
    assert Policy(release_window_tokens=8, first_release_window_tokens=32).first_window_tokens == 8


def test_categories_in_prompt_order_without_excluded() -> None:
    codes = [c.code for c in BASE.categories]
    assert codes == [*(c for c in BUILTIN_CODES if c != "S6"), "S15"]
    assert "S6" in BASE.known_codes and "S6" not in BASE.active_codes


@pytest.mark.parametrize(
    "kwargs",
    [
        {"enabled": ("S15",)},
        {"enabled": ("S1", "S1")},
        {"excluded": ("S99",)},
        {"custom": custom_categories([("A", "a")], taken=["S0"]) * 2},
        {"input_threshold": 1.5},
        {"output_threshold": float("nan")},
        {"release_window_tokens": 0},
        {"first_release_window_tokens": 0},
        {"output_context_chars": 0},
        {"output_prefilter_chars": -1},
        {"output_prefilter_below": 1.5},
        {"output_confirm_score": -0.1},
        {"timeout_seconds": 0.0},
        {"enabled": ("S1",), "excluded": ("S1",)},
    ],
)
def test_invalid_policies_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(PolicyError):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_tighten_applies_stricter_options() -> None:
    stricter = BASE.tighten(
        PolicyOptions(
            block_categories=("S6",),
            input_threshold=0.2,
            output_threshold=0.6,  # equal is not looser
            release_window_tokens=4,
            fail_open=False,
        )
    )
    assert "S6" in stricter.active_codes
    assert [c.code for c in stricter.categories][:6] == ["S1", "S2", "S3", "S4", "S5", "S6"]
    assert (stricter.input_threshold, stricter.output_threshold) == (0.2, 0.6)
    assert stricter.release_window_tokens == 4
    assert stricter.output_prefilter_below == BASE.output_prefilter_below  # output threshold unchanged
    assert BASE.tighten(PolicyOptions()) == BASE


def test_a_lower_output_threshold_lowers_the_prefilter_bar_in_proportion() -> None:
    base = Policy(output_threshold=0.5, output_prefilter_below=0.002)
    assert base.tighten(PolicyOptions(output_threshold=0.05)).output_prefilter_below == pytest.approx(0.0002)
    assert base.tighten(PolicyOptions(output_threshold=0.0)).output_prefilter_below == 0.0  # never settles
    assert base.tighten(PolicyOptions(input_threshold=0.1)).output_prefilter_below == 0.002


def test_a_lower_output_threshold_lowers_the_confirmation_bar_in_proportion() -> None:
    base = Policy(output_threshold=0.5, output_confirm_score=0.1)
    assert base.tighten(PolicyOptions(output_threshold=0.25)).output_confirm_score == pytest.approx(0.05)
    assert base.tighten(PolicyOptions(output_threshold=0.0)).output_confirm_score == 0.0  # every flag stops
    assert base.tighten(PolicyOptions(input_threshold=0.1)).output_confirm_score == 0.1
    assert base.tighten(PolicyOptions(stop_on_first_flag=True)).output_confirm_score == 0.0  # a request opts out


def test_tighten_can_enable_a_category_the_deployment_did_not() -> None:
    policy = Policy(enabled=BUILTIN_CODES[:13])
    assert "S14" in policy.tighten(PolicyOptions(block_categories=("S14",))).active_codes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PolicyOptions(input_threshold=0.9), "input_threshold may only be lowered, got 0.9 > 0.5"),
        (PolicyOptions(output_threshold=0.7), "output_threshold may only be lowered"),
        (PolicyOptions(release_window_tokens=32), "release_window_tokens may only be reduced"),
        (PolicyOptions(release_window_tokens=0), "release_window_tokens must be >= 1"),
        (PolicyOptions(fail_open=True), "fail_open may only be turned off"),
        (PolicyOptions(block_categories=("S99",)), "unknown category code 'S99'"),
        (PolicyOptions(input_threshold=-0.1), "input_threshold must be in"),
    ],
)
def test_tighten_refuses_to_loosen(options: PolicyOptions, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        BASE.tighten(options)
    assert issubclass(PolicyError, ValueError)  # the servicer maps it to INVALID_ARGUMENT


def test_decide_thresholds_per_role() -> None:
    v = BASE.decide(Role.USER, 0.5, ("S1",), backend="b", stage=Stage.INPUT, latency=0.01)
    assert v == Verdict(False, ("S1",), 0.5, "b", Stage.INPUT, 0.01)
    assert BASE.decide(Role.USER, 0.49, ("S1",), backend="b", stage=Stage.INPUT).safe
    assert BASE.decide(Role.AGENT, 0.55, ("S1",), backend="b", stage=Stage.OUTPUT).safe  # 0.6 for Agent
    assert not BASE.decide(Role.AGENT, 0.6, (), backend="b", stage=Stage.OUTPUT).safe  # no categories named


def test_decide_excluded_only_counts_as_safe() -> None:
    only_excluded = BASE.decide(Role.USER, 0.99, ("S6",), backend="b", stage=Stage.INPUT)
    assert only_excluded.safe and only_excluded.categories == ()
    mixed = BASE.decide(Role.USER, 0.99, ("S6", "S15", "S2"), backend="b", stage=Stage.INPUT)
    assert not mixed.safe and mixed.categories == ("S2", "S15")


def test_decide_rejects_unknown_codes() -> None:
    # Ignoring them would let "unsafe, category S99" pass as safe (named, but none active).
    with pytest.raises(ValueError, match="unknown category"):
        BASE.decide(Role.USER, 0.9, ("S99",), backend="b", stage=Stage.INPUT)


@pytest.mark.parametrize("score", [float("nan"), -0.1, 1.1])
def test_decide_rejects_bad_scores(score: float) -> None:
    with pytest.raises(ValueError):
        BASE.decide(Role.USER, score, (), backend="b", stage=Stage.INPUT)


def test_decide_scores_per_category() -> None:
    scores = {"S1": 0.7, "S6": 0.9, "S10": 0.1, "NOPE": 1.0}
    v = BASE.decide_scores(Role.USER, 0.8, scores, backend="c", stage=Stage.INPUT)
    assert not v.safe and v.categories == ("S1",)
    # Overall blocks, no category reaches the threshold: the top known one is named (S6, excluded: safe).
    assert BASE.decide_scores(Role.USER, 0.8, {"S6": 0.4, "S1": 0.3}, backend="c", stage=Stage.INPUT).safe
    top = BASE.decide_scores(Role.USER, 0.8, {"S6": 0.3, "S1": 0.4}, backend="c", stage=Stage.INPUT)
    assert top.categories == ("S1",)
    assert BASE.decide_scores(Role.USER, 0.3, {"S1": 0.9}, backend="c", stage=Stage.INPUT).safe


@pytest.mark.parametrize("fail_open", [False, True])
def test_on_backend_error(fail_open: bool, caplog: pytest.LogCaptureFixture) -> None:
    policy = Policy(fail_open=fail_open)
    with caplog.at_level(logging.WARNING):
        v = policy.on_backend_error(Stage.OUTPUT, RuntimeError("user text: rob a bank"), latency=0.2)
    assert v == Verdict(fail_open, (), 0.0 if fail_open else 1.0, "error", Stage.OUTPUT, 0.2, error=True)
    assert "RuntimeError" in caplog.text and "rob a bank" not in caplog.text


class _Stub:
    def __init__(self, result: Verdict | BaseException | None = None, hang: bool = False) -> None:
        self.result = result
        self.hang = hang
        self.calls = 0
        self.entered = asyncio.Event()

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        self.calls += 1
        self.entered.set()
        if self.hang:
            await asyncio.Event().wait()
        if isinstance(self.result, BaseException):
            raise self.result
        assert isinstance(self.result, Verdict)
        return self.result


@pytest.mark.parametrize("fail_open", [False, True])
async def test_fail_safe_moderator_on_error_and_timeout(fail_open: bool) -> None:
    policy = Policy(fail_open=fail_open, timeout_seconds=0.01)
    for stub in (_Stub(RuntimeError("boom")), _Stub(hang=True)):
        v = await FailSafeModerator(stub, policy).moderate(USER_TURN, Role.USER, Stage.INPUT)
        assert v.error and v.safe is fail_open and v.backend == "error"
        assert stub.calls == 1


def test_fail_safe_timeout_grows_with_the_conversation() -> None:
    guard = FailSafeModerator(_Stub(), Policy(timeout_seconds=2.0))
    assert guard.timeout_for([Message("user", "hi")]) == 2.0
    assert guard.timeout_for([Message("user", "x" * TIMEOUT_CHARS)]) == 2.0
    long = [Message("user", "x" * TIMEOUT_CHARS), Message("assistant", "y" * (2 * TIMEOUT_CHARS))]
    assert guard.timeout_for(long) == pytest.approx(6.0)


async def test_a_long_conversation_may_take_longer_than_a_short_one() -> None:
    class Slow:
        async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
            await asyncio.sleep(0.05)
            return Verdict(True, (), 0.0, "slow", stage)

    guard = FailSafeModerator(Slow(), Policy(timeout_seconds=0.02))
    short = await guard.moderate([Message("user", "hi")], Role.USER, Stage.INPUT)
    long = await guard.moderate([Message("user", "x" * (10 * TIMEOUT_CHARS))], Role.USER, Stage.INPUT)
    assert short.error and not short.safe  # 0.05 s > 0.02 s: failed closed
    assert not long.error and long.safe  # 0.05 s < 0.2 s allowed for ten times the text


async def test_fail_safe_moderator_passes_verdicts_and_client_errors_through() -> None:
    ok = Verdict(False, ("S1",), 0.9, "x", Stage.INPUT)
    stub = _Stub(ok)
    assert await FailSafeModerator(stub, Policy()).moderate(USER_TURN, Role.USER, Stage.INPUT) == ok
    with pytest.raises(ConversationError):
        await FailSafeModerator(stub, Policy()).moderate(USER_TURN, Role.AGENT, Stage.MODERATE)
    assert stub.calls == 1  # the backend never saw the bad request


async def test_fail_safe_moderator_propagates_cancellation() -> None:
    stub = _Stub(hang=True)
    task = asyncio.ensure_future(
        FailSafeModerator(stub, Policy()).moderate(USER_TURN, Role.USER, Stage.INPUT)
    )
    await stub.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
