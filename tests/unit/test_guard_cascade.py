"""CascadeModerator: clear scores stay with the first stage, the band and errors go to the second."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from guard.cascade import CascadeModerator
from guard.moderator import Message, Role, Stage, Verdict

TURN = (Message("user", "hello"),)


class Scripted:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.calls = 0

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        self.calls += 1
        return self.verdict


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


SECOND = Verdict(False, ("S9",), 0.97, "llama_guard", Stage.INPUT, latency=0.4)


@pytest.mark.parametrize(
    ("score", "escalate"),
    [(0.0, False), (0.19, False), (0.2, True), (0.5, True), (0.79, True), (0.8, False), (1.0, False)],
)
async def test_band_routing(score: float, escalate: bool) -> None:
    first_verdict = Verdict(score < 0.5, (), score, "classifier", Stage.INPUT, latency=0.01)
    first, second = Scripted(first_verdict), Scripted(SECOND)
    cascade = CascadeModerator(first, second, low=0.2, high=0.8, clock=StepClock())
    v = await cascade.moderate(TURN, Role.USER, Stage.INPUT)
    assert first.calls == 1 and second.calls == int(escalate)
    if escalate:
        assert v.backend == "llama_guard" and v.categories == ("S9",)
        assert v.latency == 1.0  # the cascade's own span, both stages included
        assert (cascade.stats.escalated, cascade.stats.first_decided) == (1, 0)
    else:
        assert v == first_verdict
        assert (cascade.stats.escalated, cascade.stats.first_decided) == (0, 1)


async def test_first_stage_error_escalates() -> None:
    err = Verdict(False, (), 1.0, "error", Stage.INPUT, error=True)
    second = Scripted(SECOND)
    v = await CascadeModerator(Scripted(err), second, 0.2, 0.8).moderate(TURN, Role.USER, Stage.INPUT)
    assert second.calls == 1 and v.backend == "llama_guard"


@pytest.mark.parametrize(("low", "high"), [(0.8, 0.2), (-0.1, 0.5), (0.5, 1.1)])
def test_invalid_band(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="cascade band"):
        CascadeModerator(Scripted(SECOND), Scripted(SECOND), low, high)
