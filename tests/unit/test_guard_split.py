"""RoleSplitModerator: User turns go to one backend, Agent turns to the other, verdicts unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from guard.moderator import Message, Role, Stage, Verdict
from guard.split import RoleSplitModerator

CONVERSATION = (Message("user", "hello"), Message("assistant", "hi there"))


class Recording:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.calls: list[tuple[Role, Stage]] = []

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        self.calls.append((role, stage))
        return self.verdict


@pytest.mark.parametrize(("role", "stage"), [(Role.USER, Stage.INPUT), (Role.USER, Stage.MODERATE),
                                             (Role.AGENT, Stage.OUTPUT), (Role.AGENT, Stage.MODERATE)])
async def test_each_role_is_judged_by_its_own_backend_only(role: Role, stage: Stage) -> None:
    user = Recording(Verdict(True, (), 0.1, "classifier", stage, latency=0.01))
    agent = Recording(Verdict(False, ("S6",), 0.9, "classifier", stage, latency=0.02))
    split = RoleSplitModerator(user, agent)
    verdict = await split.moderate(CONVERSATION, role, stage)
    chosen, other = (agent, user) if role is Role.AGENT else (user, agent)
    assert verdict is chosen.verdict  # returned unchanged: its thresholds, categories and latency
    assert chosen.calls == [(role, stage)] and other.calls == []
    assert split.for_role(role) is chosen
