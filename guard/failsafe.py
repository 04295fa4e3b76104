"""`FailSafeModerator`: a policy's timeout and its fail-open / fail-closed rule around any moderation backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from guard.moderator import Message, Moderator, Role, Stage, Verdict
from guard.policy import TIMEOUT_CHARS, Policy
from guard.prompt import judged_turns


class FailSafeModerator:
    """Wraps any moderator with the policy's timeout and fail-open / fail-closed rule.

    A conversation that cannot be judged (`ConversationError`, a client error) is raised before the
    backend runs; every backend failure becomes `policy.on_backend_error`. Cancellation propagates.
    """

    def __init__(
        self, inner: Moderator, policy: Policy, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._clock = clock

    @property
    def policy(self) -> Policy:
        """The policy applied on errors and timeouts."""
        return self._policy

    def timeout_for(self, conversation: Sequence[Message]) -> float:
        """Seconds a check of `conversation` may take: `timeout_seconds` per `TIMEOUT_CHARS` characters of all
        its turns, at least `timeout_seconds` (every backend reads at most the whole conversation)."""
        chars = sum(len(m.content) for m in conversation)
        return self._policy.timeout_seconds * max(1.0, chars / TIMEOUT_CHARS)

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        """Judge with the inner moderator; errors and timeouts become the policy's error verdict.

        Args:
            conversation: the turns, oldest first; the last one belongs to `role`.
            role: whose last message is judged.
            stage: input / output / moderate.

        Returns:
            The inner verdict, or an error verdict (error=True).
        """
        judged_turns(conversation, role)  # raises ConversationError: the caller's fault, not the backend's
        start = self._clock()
        try:
            return await asyncio.wait_for(
                self._inner.moderate(conversation, role, stage), self.timeout_for(conversation)
            )
        except Exception as exc:  # any backend failure is a policy decision, logged and flagged error=True
            return self._policy.on_backend_error(stage, exc, latency=self._clock() - start)
