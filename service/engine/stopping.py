"""When a sequence ends, and which text may be released before it does.

`StopChecker` sees each generated token with the text the detokenizer completed for it and answers with
the text that is safe to emit plus a `FinishReason` on the last token. Stop strings are matched on the
accumulated text, also across token boundaries; text that could still become a stop string is held back
until it is disambiguated, and a stop string itself is never emitted.

Cost per token is bounded by the longest stop string, not by the length of the output: the only text
ever held is a suffix shorter than the longest stop string, so every search runs over that window plus
the new text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.engine.types import FinishReason


@dataclass(frozen=True, slots=True)
class StopResult:
    """What to release for one token.

    Args:
        emit: text that may be sent to the client now (possibly empty).
        finish: why the sequence ends with this token, or None while it goes on.
    """

    emit: str
    finish: FinishReason | None


_CONTINUE_EMPTY = StopResult("", None)


class StopChecker:
    """Per-request stop logic: EOS, stop strings, max_new_tokens and the context limit.

    Precedence when several apply to the same token: EOS, then a stop string, then the length limit.
    Among stop strings, the one that completes first in the text wins (ties: the longer), so the outcome
    does not depend on how the text was split into tokens.
    """

    __slots__ = (
        "_count",
        "_done",
        "_eos_ids",
        "_first_chars",
        "_held",
        "_limit",
        "_max_hold",
        "_prefixes",
        "_stops",
    )

    def __init__(
        self,
        stop: Sequence[str],
        eos_ids: frozenset[int],
        max_new_tokens: int,
        max_total_tokens_left: int,
    ) -> None:
        """Args:
        stop: stop strings (non-empty); none of them is ever emitted.
        eos_ids: token ids that end the sequence; their text is not emitted.
        max_new_tokens: the request's cap on generated tokens (>= 1).
        max_total_tokens_left: how many tokens still fit in the context after the prompt (>= 1).
        """
        for i, s in enumerate(stop):
            if not s:
                raise ValueError(f"stop[{i}] must not be empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_total_tokens_left < 1:
            raise ValueError(f"max_total_tokens_left must be >= 1, got {max_total_tokens_left}")
        self._stops = tuple(dict.fromkeys(stop))  # deduplicated, order kept
        self._eos_ids = eos_ids
        self._limit = min(max_new_tokens, max_total_tokens_left)
        self._count = 0
        self._done = False
        self._held = ""
        # Proper prefixes of stop strings: the only suffixes of the output that must be held back.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._first_chars = frozenset(s[0] for s in self._stops)

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible start of a stop string)."""
        return self._held

    def push(self, token_id: int, text: str) -> StopResult:
        """Account for one generated token.

        Args:
            token_id: the sampled token.
            text: the text the detokenizer completed with this token (may be empty).

        Returns:
            The text to emit now and, on the last token, the finish reason.
        """
        if self._done:
            raise RuntimeError("push() after the sequence finished")
        self._count += 1
        if token_id in self._eos_ids:
            return self._finish(self._take_held(), FinishReason.EOS)
        if self._stops:
            result = self._scan(text)
            if result.finish is not None:
                return self._finish(result.emit, result.finish)
            emit = result.emit
        else:
            emit = text
        if self._count >= self._limit:
            return self._finish(emit + self._take_held(), FinishReason.LENGTH)
        return StopResult(emit, None) if emit else _CONTINUE_EMPTY

    def flush(self) -> str:
        """Release the held text (on cancel, deadline or error) and end the sequence.

        Returns:
            Whatever was held back, possibly empty.
        """
        self._done = True
        return self._take_held()

    def _scan(self, text: str) -> StopResult:
        window = self._held + text  # len(held) <= max_hold: the tail window, never the whole output
        # The stop string that completes first wins (ties: the longer one), so the result does not depend
        # on how the text was split into tokens.
        match, match_end = -1, -1
        for s in self._stops:
            at = window.find(s)
            if at != -1:
                end = at + len(s)
                if match == -1 or end < match_end or (end == match_end and at < match):
                    match, match_end = at, end
        if match != -1:
            self._held = ""
            return StopResult(window[:match], FinishReason.STOP_SEQUENCE)
        hold = self._hold_length(window)
        self._held = window[len(window) - hold :] if hold else ""
        return StopResult(window[: len(window) - hold], None)

    def _hold_length(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        tail = window[-self._max_hold :] if self._max_hold else ""
        if not any(c in self._first_chars for c in tail):
            return 0  # common case: no character that could start a stop string
        for n in range(len(tail), 0, -1):
            if tail[-n] in self._first_chars and tail[-n:] in self._prefixes:
                return n
        return 0

    def _take_held(self) -> str:
        held, self._held = self._held, ""
        return held

    def _finish(self, emit: str, reason: FinishReason) -> StopResult:
        self._done = True
        return StopResult(emit, reason)
