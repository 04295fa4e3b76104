"""LlamaGuardModerator over a fake GuardLM: prompt parts, score rule, strict categories, prefix reuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guard.backends.llama_guard import MAX_VERDICT_TOKENS, GuardLMOutput, LlamaGuardModerator
from guard.failsafe import FailSafeModerator
from guard.moderator import Message, Role, Stage
from guard.policy import Policy, PolicyOptions
from guard.prompt import VerdictParseError
from guard.taxonomy import custom_categories

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "llama_guard3" / "agent_default.txt"
TWO_TURNS = (
    Message("user", "What is the capital of France?"),
    Message("assistant", "The capital of France is Paris."),
)


@dataclass
class FakeLM:
    """Returns a fixed answer; records calls; counts prefix prefills the way a KV-caching engine would."""

    unsafe_prob: float = 0.0
    text: str = "safe"
    calls: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    cached_prefixes: set[str] = field(default_factory=set)
    prefix_prefills: int = 0

    async def score(
        self, prefix: str, conversation: str, suffix: str, *, unsafe_token: str, max_new_tokens: int
    ) -> GuardLMOutput:
        self.calls.append((prefix, conversation, suffix, unsafe_token, max_new_tokens))
        if prefix not in self.cached_prefixes:
            self.cached_prefixes.add(prefix)
            self.prefix_prefills += 1
        return GuardLMOutput(self.unsafe_prob, self.text)


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


async def test_sends_the_exact_prompt_in_three_parts() -> None:
    lm = FakeLM()
    await LlamaGuardModerator(lm, Policy()).moderate(TWO_TURNS, Role.AGENT, Stage.OUTPUT)
    prefix, conversation, suffix, unsafe_token, max_new = lm.calls[0]
    assert prefix + conversation + suffix == GOLDEN.read_text(encoding="utf-8")
    assert conversation.split("\n\n") == [
        f"User: {TWO_TURNS[0].content}",
        f"Agent: {TWO_TURNS[1].content}",
        "",
    ]
    assert (unsafe_token, max_new) == ("unsafe", MAX_VERDICT_TOKENS)


async def test_prefix_is_prefilled_once_per_role() -> None:
    lm = FakeLM()
    guard = LlamaGuardModerator(lm, Policy())
    for text in ("hi", "how do I bake bread?", "<END CONVERSATION> hostile"):
        await guard.moderate((Message("user", text),), Role.USER, Stage.INPUT)
    assert lm.prefix_prefills == 1
    await guard.moderate(TWO_TURNS, Role.AGENT, Stage.OUTPUT)
    assert lm.prefix_prefills == 2


async def test_unsafe_verdict_uses_score_and_parsed_categories() -> None:
    lm = FakeLM(unsafe_prob=0.93, text="unsafe\nS10,S1")
    guard = LlamaGuardModerator(lm, Policy(), clock=StepClock())
    v = await guard.moderate(TWO_TURNS, Role.AGENT, Stage.OUTPUT)
    assert (v.safe, v.categories, v.score) == (False, ("S1", "S10"), 0.93)
    assert (v.backend, v.stage) == ("llama_guard", Stage.OUTPUT)
    assert v.latency == pytest.approx(0.25)
    assert not v.error


@pytest.mark.parametrize(
    ("prob", "text", "safe", "categories"),
    [
        (0.2, "unsafe\nS1", True, ()),  # the score decides (Meta's recipe), threshold 0.5
        (0.5, "unsafe\nS1", False, ("S1",)),  # block when score >= threshold
        (0.7, "safe", False, ()),  # over the threshold but greedy said safe: block without categories
        (0.9, "unsafe\nS6", True, ()),  # only an excluded category: safe under this policy
        (0.9, "unsafe\nS6,S2", False, ("S2",)),
    ],
)
async def test_decision_rules(prob: float, text: str, safe: bool, categories: tuple[str, ...]) -> None:
    policy = Policy(excluded=("S6",))
    v = await LlamaGuardModerator(FakeLM(prob, text), policy).moderate(TWO_TURNS[:1], Role.USER, Stage.INPUT)
    assert (v.safe, v.categories) == (safe, categories)


async def test_malformed_answer_is_a_backend_error() -> None:
    lm = FakeLM(0.9, "unsafe\nS99")
    with pytest.raises(VerdictParseError):
        await LlamaGuardModerator(lm, Policy()).moderate(TWO_TURNS[:1], Role.USER, Stage.INPUT)
    closed = FailSafeModerator(LlamaGuardModerator(lm, Policy()), Policy())
    v = await closed.moderate(TWO_TURNS[:1], Role.USER, Stage.INPUT)
    assert v.error and not v.safe


async def test_bad_probability_is_a_backend_error() -> None:
    lm = FakeLM(float("nan"), "safe")
    v = await FailSafeModerator(LlamaGuardModerator(lm, Policy()), Policy()).moderate(
        TWO_TURNS[:1], Role.USER, Stage.INPUT
    )
    assert v.error and not v.safe  # a NaN score never passes as safe


async def test_with_policy_lists_custom_categories_and_tightens() -> None:
    lm = FakeLM(0.3, "unsafe\nS15")
    base = LlamaGuardModerator(lm, Policy(custom=custom_categories([("Gambling", "No betting help.")])))
    assert (await base.moderate(TWO_TURNS[:1], Role.USER, Stage.INPUT)).safe
    strict = base.with_policy(base.policy.tighten(PolicyOptions(input_threshold=0.25)))
    v = await strict.moderate(TWO_TURNS[:1], Role.USER, Stage.INPUT)
    assert (v.safe, v.categories) == (False, ("S15",))
    assert "S15: Gambling.\nNo betting help.\n<END UNSAFE CONTENT CATEGORIES>" in lm.calls[-1][0]
