"""StreamGuard's held flags (`confirm_score`): a flagged check holds its window for the next check to confirm or
clear, and still no text is released before a clearing verdict covers it."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.moderator import Stage, Verdict
from guard.stream import text_stream_guard
from tests.unit.test_guard_stream import ScoredJudge


async def test_confirmation_releases_a_lone_flag_once_the_next_check_clears_it() -> None:
    judge = ScoredJudge([(False, 0.8), (True, 0.05)])
    guard = text_stream_guard(judge, window=2, confirm_score=0.1)
    await guard.feed("a")
    assert await guard.feed("b") == [] and not guard.blocked  # flagged: held, not stopped
    assert await guard.feed("c") == []
    assert await guard.feed("d") == ["a", "b", "c", "d"]  # the longer text cleared it: all released
    assert judge.seen == ["ab", "abcd"]  # the confirming check read the held text too
    assert guard.stats.flags_cleared == 1 and guard.stats.flags_confirmed == 0
    assert await guard.finish() == ([], Verdict(True, (), 0.05, "fake", Stage.OUTPUT))


@pytest.mark.parametrize("second", [(False, 0.9), (True, 0.1), (True, 0.4)])
async def test_confirmation_stops_when_the_next_check_flags_or_reaches_the_bar(second: tuple[bool, float]) -> None:
    judge = ScoredJudge([(True, 0.0), (False, 0.7), second])
    guard = text_stream_guard(judge, window=2, confirm_score=0.1)
    await guard.feed("a")
    assert await guard.feed("b") == ["a", "b"]
    await guard.feed("c")
    assert await guard.feed("d") == []
    await guard.feed("e")
    assert await guard.feed("f") == [] and guard.blocked
    assert guard.verdict is not None and guard.verdict.categories == ("S1",)  # a safe confirmer: the flag's own
    assert guard.verdict.score == (second[1] if not second[0] else 0.7)
    assert guard.stats.flags_confirmed == 1 and guard.stats.tokens_withheld == 4
    assert await guard.feed("g") == [] and (await guard.finish())[0] == []


async def test_confirmation_never_waits_past_the_end_or_on_errors() -> None:
    # a flag at the final check stops at once
    guard = text_stream_guard(ScoredJudge([(True, 0.0), (False, 0.9)]), window=2, confirm_score=0.1)
    await guard.feed("a")
    await guard.feed("b")
    await guard.feed("c")
    assert (await guard.finish())[1].safe is False
    # a held flag with nothing new after it stands, without judging the same text again
    judge = ScoredJudge([(False, 0.9)])
    guard = text_stream_guard(judge, window=2, confirm_score=0.1)
    await guard.feed("a")
    await guard.feed("b")
    await guard.feed("")
    released, verdict = await guard.finish()
    assert released == [] and not verdict.safe and judge.seen == ["ab"]
    # a backend error fails closed at once

    async def failing(text: str) -> Verdict:
        return Verdict(False, (), 1.0, "error", Stage.OUTPUT, error=True)

    guard = text_stream_guard(failing, window=1, confirm_score=0.1)
    assert await guard.feed("a") == [] and guard.blocked
    # a confirming check that fails open cannot clear a flag
    verdicts = iter([Verdict(False, ("S1",), 0.9, "fake", Stage.OUTPUT),
                     Verdict(True, (), 0.0, "error", Stage.OUTPUT, error=True)])

    async def flag_then_fail_open(text: str) -> Verdict:
        return next(verdicts)

    guard = text_stream_guard(flag_then_fail_open, window=1, confirm_score=0.1)
    assert await guard.feed("a") == [] and not guard.blocked
    assert await guard.feed("b") == [] and guard.blocked
    assert guard.verdict is not None and guard.verdict.categories == ("S1",)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["", "a", "bc", " ", "long piece of text"]), max_size=30),
    script=st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.05, 0.2, 0.9])), max_size=16),
    window=st.integers(min_value=1, max_value=5),
    context_chars=st.none() | st.integers(min_value=1, max_value=40),
)
def test_confirmation_never_releases_text_a_clearing_verdict_did_not_cover(
        pieces: list[str], script: list[tuple[bool, float]], window: int, context_chars: int | None) -> None:
    async def run() -> None:
        judge = ScoredJudge(list(script))
        guard = text_stream_guard(judge, window=window, first_window=1, context_chars=context_chars,
                                  confirm_score=0.1)
        fed, released, cleared, flagged = "", "", "", ""
        held = blocked = False

        async def step(call: object, final: bool) -> None:
            nonlocal cleared, blocked, released, held, flagged
            before = len(judge.seen)
            out = await call  # type: ignore[misc]
            items = out if isinstance(out, list) else out[0]
            calls = judge.seen[before:]
            assert len(calls) <= 1
            if calls:
                assert fed.endswith(calls[0]) and len(calls[0]) >= len(fed) - len(cleared)
                safe, score = script[before] if before < len(script) else (True, 0.0)
                if held:  # the confirming check: clears only when safe and below the bar
                    held = False
                    blocked = not safe or score >= 0.1
                elif not safe:
                    held, blocked, flagged = not final, final, fed
                if not blocked and not held:
                    cleared = fed
            elif held and fed == flagged and (final or guard.blocked):
                held, blocked = False, True  # a check with nothing new after the flag: it stands
            released += "".join(items)
            assert cleared.startswith(released)  # released text is covered by a clearing verdict
            assert guard.blocked == blocked
            if blocked or held:
                assert not items
            # at most two windows withheld while a flag waits
            assert guard.stats.tokens_fed - guard.stats.tokens_released - guard.stats.tokens_withheld < 2 * window

        for piece in pieces:
            fed += piece
            await step(guard.feed(piece), False)
            if blocked:
                break
        await step(guard.finish(), True)

    asyncio.run(run())
