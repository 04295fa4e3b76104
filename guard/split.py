"""One moderator per role: User turns to one backend, Agent turns to another.

A head tuned for answers need not be the best judge of requests, and the other way round (docs/GUARD.md,
"Sixteenth and seventeenth rounds"). `RoleSplitModerator` sends every judgment of User turns (input checks,
`Moderate` as User) to `user` and every judgment of Agent turns (output checks, `Moderate` as Agent) to
`agent`; each keeps its own thresholds and policy handling, and its verdict is returned unchanged. A check runs
one of the two, so per-check cost is that backend's. Exceptions propagate: wrap it in
`guard.failsafe.FailSafeModerator`.
"""

from __future__ import annotations

from collections.abc import Sequence

from guard.moderator import Message, Moderator, Role, Stage, Verdict


class RoleSplitModerator:
    """`Moderator` judging User turns with `user` and Agent turns with `agent`.

    Args:
        user: judges requests (input checks, `Moderate` as User).
        agent: judges answers (output checks, `Moderate` as Agent).
    """

    def __init__(self, user: Moderator, agent: Moderator) -> None:
        self.user = user
        self.agent = agent

    def for_role(self, role: Role) -> Moderator:
        """The backend that judges `role`'s turns."""
        return self.agent if role is Role.AGENT else self.user

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        """The verdict of the backend for `role` (`Moderator.moderate`)."""
        return await self.for_role(role).moderate(conversation, role, stage)
