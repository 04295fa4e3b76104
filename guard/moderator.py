"""The moderation seam: conversations in, verdicts out. Pure types and the `Moderator` protocol.

`guard/` never imports `service/`: a backend that needs a language model receives it injected.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Role(enum.StrEnum):
    """Whose messages are judged, as in Llama Guard's task line ('User' or 'Agent')."""

    USER = "User"
    AGENT = "Agent"


class Stage(enum.StrEnum):
    """Where in the pipeline a verdict was taken. Bounded: used as a metric label."""

    INPUT = "input"
    OUTPUT = "output"
    MODERATE = "moderate"  # the Moderation.Moderate RPC


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. `role` is 'user' or 'assistant' (a 'system' turn is not judged)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """A Llama Guard-style judgement.

    Args:
        safe: False if the content must be blocked under the policy in force.
        categories: violated category codes such as ("S1", "S9"), sorted, empty when safe.
        score: probability-like unsafe score in [0, 1].
        backend: which backend decided ("classifier", "llama_guard", "error", ...).
        stage: input / output / moderate.
        latency: seconds spent deciding.
        error: True when the verdict comes from the fail-open / fail-closed policy after a backend error.
    """

    safe: bool
    categories: tuple[str, ...] = ()
    score: float = 0.0
    backend: str = ""
    stage: Stage = Stage.INPUT
    latency: float = 0.0
    error: bool = False


class Moderator(Protocol):
    """Judges the last turn(s) of `conversation` that belong to `role`."""

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict: ...
