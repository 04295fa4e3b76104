"""StreamGuard: no piece is released before a safe verdict covers it; nothing after an unsafe one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.moderator import Stage, Verdict
from guard.stream import StreamGuard, check_points, judged_tail, text_stream_guard

SAFE = Verdict(True, (), 0.1, "fake", Stage.OUTPUT)
UNSAFE = Verdict(False, ("S1",), 0.9, "fake", Stage.OUTPUT)


@dataclass
class FakeJudge:
    """Answers from a script (then safe); records what it was asked."""

    script: list[bool] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    async def __call__(self, text: str) -> Verdict:
        self.seen.append(text)
        index = len(self.seen) - 1
        safe = self.script[index] if index < len(self.script) else True
        return SAFE if safe else UNSAFE


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_releases_a_window_at_a_time() -> None:
    judge = FakeJudge()
    guard = text_stream_guard(judge, window=3)
    assert await guard.feed("a") == []
    assert await guard.feed("b") == []
    assert await guard.feed("c") == ["a", "b", "c"]
    assert await guard.feed("d") == []
    released, verdict = await guard.finish()
    assert released == ["d"] and verdict == SAFE
    assert judge.seen == ["abc", "abcd"]
    assert guard.stats.judge_calls == 2 and guard.stats.judged_tokens == 3 + 4
    assert guard.stats.tokens_released == 4 and guard.stats.tokens_withheld == 0


async def test_unsafe_window_releases_nothing_more() -> None:
    judge = FakeJudge(script=[True, False])
    guard = text_stream_guard(judge, window=2)
    assert await guard.feed("ok ") == []
    assert await guard.feed("fine ") == ["ok ", "fine "]
    assert await guard.feed("bad ") == []
    assert await guard.feed("worse ") == []
    assert guard.blocked and guard.verdict == UNSAFE
    assert await guard.feed("more") == []
    assert await guard.finish() == ([], UNSAFE)
    assert len(judge.seen) == 2  # no judge call once blocked
    assert guard.stats.tokens_withheld == 3 and guard.stats.tokens_fed == 5


async def test_unsafe_at_the_end_withholds_the_tail() -> None:
    guard = text_stream_guard(FakeJudge(script=[True, False]), window=2)
    await guard.feed("a")
    assert await guard.feed("b") == ["a", "b"]
    assert await guard.feed("c") == []
    assert await guard.finish() == ([], UNSAFE)


async def test_empty_generation_is_judged() -> None:
    judge = FakeJudge()
    guard = text_stream_guard(judge, window=4)
    assert await guard.finish() == ([], SAFE)
    assert judge.seen == [""]


async def test_exact_window_end_needs_no_extra_call() -> None:
    judge = FakeJudge()
    guard = text_stream_guard(judge, window=2)
    await guard.feed("a")
    await guard.feed("b")
    assert await guard.finish() == ([], SAFE)
    assert judge.seen == ["ab"]


async def test_empty_pieces_after_a_safe_verdict_need_no_call() -> None:
    judge = FakeJudge()
    guard = text_stream_guard(judge, window=2)
    await guard.feed("a")
    await guard.feed("b")
    await guard.feed("")  # e.g. a detokenizer holding back half a UTF-8 character
    assert await guard.finish() == ([""], SAFE)
    assert judge.seen == ["ab"]


async def test_judge_failure_closes_the_guard() -> None:
    async def broken(text: str) -> Verdict:
        raise RuntimeError("backend down")

    guard = text_stream_guard(broken, window=1)
    with pytest.raises(RuntimeError, match="backend down"):
        await guard.feed("a")
    assert guard.blocked
    assert await guard.feed("b") == []
    with pytest.raises(RuntimeError, match="judge raised"):
        await guard.finish()


async def test_generic_items_and_latency_stats() -> None:
    clock = FakeClock()

    async def slow_judge(text: str) -> Verdict:
        clock.now += 0.5  # the judge "takes" half a second of the fake clock
        return SAFE

    guard: StreamGuard[tuple[int, str]] = StreamGuard(slow_judge, 2, text_of=lambda e: e[1], clock=clock)
    assert await guard.feed((7, "x")) == []
    clock.now += 0.1
    assert await guard.feed((8, "y")) == [(7, "x"), (8, "y")]
    assert guard.stats.judge_seconds == pytest.approx(0.5)
    # piece 7 waited 0.1 + 0.5, piece 8 waited 0.5
    assert guard.stats.release_delay_seconds == pytest.approx(1.1)
    assert guard.stats.max_release_delay_seconds == pytest.approx(0.6)


async def test_first_windows_are_shorter_and_double_up_to_the_window() -> None:
    judge = FakeJudge()
    guard = text_stream_guard(judge, window=8, first_window=2)
    released = [await guard.feed(str(i % 10)) for i in range(20)]
    # checks after 2, 2+4, 2+4+8, 2+4+8+8 pieces; then the tail at finish
    assert [i + 1 for i, r in enumerate(released) if r] == [2, 6, 14]
    assert [len(r) for r in released if r] == [2, 4, 8]
    tail, _ = await guard.finish()
    assert len(tail) == 6 and [len(t) for t in judge.seen] == [2, 6, 14, 20]
    assert guard.next_window == guard.window == 8
    # a first window larger than the window is the window
    capped = text_stream_guard(FakeJudge(), window=3, first_window=10)
    assert capped.next_window == 3


async def test_misuse_raises() -> None:
    with pytest.raises(ValueError):
        text_stream_guard(FakeJudge(), window=0)
    with pytest.raises(ValueError):
        text_stream_guard(FakeJudge(), window=4, first_window=0)
    guard = text_stream_guard(FakeJudge(), window=1)
    await guard.finish()
    with pytest.raises(RuntimeError):
        await guard.feed("late")
    with pytest.raises(RuntimeError):
        await guard.finish()


async def _run(pieces: list[str], script: list[bool], window: int, first_window: int | None = None,
               context_chars: int | None = None) -> None:
    judge = FakeJudge(script=list(script))
    guard = text_stream_guard(judge, window=window, first_window=first_window, context_chars=context_chars)
    released: list[str] = []
    covered: list[str] = []  # per judge call, the whole text generated when it was asked
    cleared = ""  # text covered by the latest safe verdict
    released_at_block: int | None = None
    fed = ""

    def after_call(calls_before: int) -> None:
        if len(judge.seen) == calls_before:
            return
        assert len(judge.seen) == calls_before + 1
        asked = judge.seen[-1]
        previous = len(covered[-1]) if covered else 0  # the judge's earlier calls were all safe
        assert fed.endswith(asked)
        # each call reads every character no safe verdict covered yet, and the context it was given
        assert len(asked) >= len(fed) - previous
        assert len(asked) >= min(len(fed), len(fed) if context_chars is None else context_chars)
        covered.append(fed)

    def observe() -> None:
        nonlocal cleared, released_at_block
        for i, whole in enumerate(covered):
            safe = script[i] if i < len(script) else True
            if not safe:
                if released_at_block is None:
                    released_at_block = len(released)
                break
            cleared = whole
        text = "".join(released)
        # The invariant: released text is always a prefix of what a safe verdict covered.
        assert cleared.startswith(text)
        if released_at_block is not None:
            assert len(released) == released_at_block

    for piece in pieces:
        calls_before = len(judge.seen)
        fed += piece
        released += await guard.feed(piece)
        after_call(calls_before)
        observe()
        # what the client waits for is bounded by the window, whatever the first window
        stats = guard.stats
        assert stats.tokens_fed - stats.tokens_released - stats.tokens_withheld < window
    calls_before = len(judge.seen)
    tail, verdict = await guard.finish()
    after_call(calls_before)
    released += tail
    observe()
    if released_at_block is None:
        assert verdict.safe and "".join(released) == "".join(pieces)
    else:
        assert not verdict.safe and guard.blocked
    assert guard.stats.tokens_released == len(released)
    assert guard.stats.tokens_released + guard.stats.tokens_withheld == len(pieces)


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["", "a", "bc", " ", "é", "\n", "long piece of text"]), max_size=30),
    script=st.lists(st.booleans(), max_size=12),
    window=st.integers(min_value=1, max_value=6),
    first_window=st.none() | st.integers(min_value=1, max_value=8),
    context_chars=st.none() | st.integers(min_value=1, max_value=40),
)
def test_never_releases_uncleared_text(pieces: list[str], script: list[bool], window: int,
                                       first_window: int | None, context_chars: int | None) -> None:
    # a context shorter than a window's text must still cover all of it (long pieces, tiny contexts)
    asyncio.run(_run(pieces, script, window, first_window, context_chars))


@pytest.mark.parametrize(("text", "cleared", "context", "want"), [
    ("abcdef", 0, None, "abcdef"), ("abcdef", 4, None, "abcdef"),  # no context: the whole text
    ("abcdef", 4, 3, "def"),  # the context covers the uncleared "ef" and one cleared character
    ("abcdef", 2, 3, "cdef"),  # 4 uncleared characters: the tail reaches back past the context
    ("abcdef", 0, 100, "abcdef"), ("", 0, 5, ""),
])
def test_judged_tail_reaches_back_over_uncleared_text(text: str, cleared: int, context: int | None,
                                                      want: str) -> None:
    assert judged_tail(text, cleared, context) == want


@pytest.mark.parametrize(("n", "first", "window"), [(0, 4, 16), (3, 4, 16), (4, 4, 16), (50, 4, 16), (50, 16, 16),
                                                    (33, 2, 8), (20, 20, 6), (20, None, 6)])
def test_check_points_replay_the_stream_guards_checks(n: int, first: int | None, window: int) -> None:
    async def run() -> list[int]:
        judge = FakeJudge()
        guard = text_stream_guard(judge, window=window, first_window=first)
        for _ in range(n):
            await guard.feed("x")
        await guard.finish()
        return [len(text) for text in judge.seen]

    assert check_points(n, window, first) == asyncio.run(run())
