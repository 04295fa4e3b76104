"""A two-stage moderator: a cheap first stage decides clear cases, the uncertain band goes to the second.

Routing uses the first stage's score only: score < low or score >= high returns the first verdict
unchanged (so its policy, thresholds and excluded categories still apply); low <= score < high, or a
first-stage error verdict, asks the second stage, whose verdict is returned with the cascade's total
latency. Configure low <= threshold <= high so that what the first stage decides alone is what it is
confident about. Exceptions propagate: wrap the cascade in `guard.failsafe.FailSafeModerator`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from guard.moderator import Message, Moderator, Role, Stage, Verdict


@dataclass(slots=True)
class CascadeStats:
    """Counters for metrics.

    Args:
        first_decided: checks answered by the first stage alone.
        escalated: checks sent to the second stage (uncertain band or first-stage error).
    """

    first_decided: int = 0
    escalated: int = 0


class CascadeModerator:
    """`Moderator` routing the uncertain band of `first`'s score to `second`.

    Args:
        first: the cheap stage (the embedded classifier).
        second: the expensive stage (`llama_guard`).
        low: scores below this are clear enough for `first` (0 <= low <= high <= 1).
        high: scores at or above this are clear enough for `first`.
        clock: seconds, for the verdict's latency.
    """

    def __init__(
        self,
        first: Moderator,
        second: Moderator,
        low: float,
        high: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not (0.0 <= low <= high <= 1.0):
            raise ValueError(f"cascade band must satisfy 0 <= low <= high <= 1, got low={low} high={high}")
        self._first = first
        self._second = second
        self._low = low
        self._high = high
        self._clock = clock
        self.stats = CascadeStats()

    def routes_to_second(self, verdict: Verdict) -> bool:
        """Whether `first`'s verdict is uncertain (in the band) or an error.

        Args:
            verdict: the first stage's verdict.

        Returns:
            True to escalate.
        """
        return verdict.error or self._low <= verdict.score < self._high

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        """Judge with `first`, and with `second` when `first` is uncertain.

        Args:
            conversation: the turns, oldest first; the last one belongs to `role`.
            role: whose last message is judged.
            stage: input / output / moderate.

        Returns:
            The deciding stage's verdict (its `backend` names it), latency covering both stages.
        """
        start = self._clock()
        verdict = await self._first.moderate(conversation, role, stage)
        if not self.routes_to_second(verdict):
            self.stats.first_decided += 1
            return verdict
        self.stats.escalated += 1
        second = await self._second.moderate(conversation, role, stage)
        return replace(second, latency=self._clock() - start)
