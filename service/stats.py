"""Stats are data: what the pipeline records about each request, for metrics.py (or a test) to consume.

Nothing here names a prompt, a completion or a request id: records carry counts, durations and bounded
labels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from guard.moderator import Verdict
from guard.stream import PrefilterOutcome


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request (any RPC that generates or moderates).

    Args:
        rpc: "Generate", "Complete", "Moderate", "Tokenize", ...
        finish_reason: a bounded label: eos, length, stop_sequence, content_filter, cancelled, deadline,
            error, rejected.
        prompt_tokens / completion_tokens: usage.
        queue_seconds: arrival -> engine slot.
        ttft_seconds: arrival -> first text released to the client (includes queue and the input guard);
            None when no text was released.
        e2e_seconds: arrival -> end.
        inter_token_seconds: gaps between successive releases to the client.
    """

    rpc: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float | None = None
    ttft_seconds: float | None = None
    e2e_seconds: float = 0.0
    inter_token_seconds: Sequence[float] = field(default_factory=tuple)


class StatsSink(Protocol):
    """Receives records; metrics.py implements it, tests may collect."""

    def record_request(self, record: RequestRecord) -> None: ...

    def record_verdict(self, verdict: Verdict) -> None: ...

    def record_prefilter(self, outcome: PrefilterOutcome) -> None:
        """An output check that read the prefilter's short tail: "prefilter" (it settled the check) or
        "escalated" (the full tail decided)."""
        ...

    def record_held_flags(self, confirmed: int, cleared: int) -> None:
        """One stream's flagged output checks held for confirmation (`guard.output_confirm_score`): how many
        the next check confirmed (the stream stopped) and how many it cleared (the held text was released)."""
        ...


class NullSink:
    """Discards everything (metrics disabled)."""

    def record_request(self, record: RequestRecord) -> None:
        return None

    def record_verdict(self, verdict: Verdict) -> None:
        return None

    def record_prefilter(self, outcome: PrefilterOutcome) -> None:
        return None

    def record_held_flags(self, confirmed: int, cleared: int) -> None:
        return None


class ListSink:
    """Keeps everything in memory (tests)."""

    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []
        self.verdicts: list[Verdict] = []
        self.prefilter: list[PrefilterOutcome] = []
        self.held_flags: list[tuple[int, int]] = []  # (confirmed, cleared) per stream that held any

    def record_request(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def record_verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    def record_prefilter(self, outcome: PrefilterOutcome) -> None:
        self.prefilter.append(outcome)

    def record_held_flags(self, confirmed: int, cleared: int) -> None:
        self.held_flags.append((confirmed, cleared))
