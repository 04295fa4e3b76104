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


@dataclass
class ScoredJudge:
    """Answers (safe, score) from a script (then clearly safe); records the text asked at each call."""

    script: list[tuple[bool, float]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    async def __call__(self, text: str) -> Verdict:
        self.seen.append(text)
        i = len(self.seen) - 1
        safe, score = self.script[i] if i < len(self.script) else (True, 0.0)
        return Verdict(safe, () if safe else ("S1",), score, "fake", Stage.OUTPUT)


async def test_prefilter_settles_clearly_safe_checks_with_the_short_tail() -> None:
    judge = ScoredJudge([(True, 0.01)])
    guard = text_stream_guard(judge, window=2, context_chars=10, prefilter_chars=4, prefilter_below=0.02)
    assert await guard.feed("abcdefgh") == []
    assert await guard.feed("ijkl") == ["abcdefgh", "ijkl"]
    assert judge.seen == ["abcdefghijkl"]  # all uncleared: the short tail is the whole text, one call suffices
    assert await guard.feed("mn") == []
    assert await guard.feed("op") == ["mn", "op"]
    assert judge.seen[1] == "mnop"  # the last 4 characters, clearly safe: no full-tail call
    assert guard.stats.prefilter_passes == 1 and guard.stats.judge_calls == 2


async def test_prefilter_escalates_and_the_full_tail_decides() -> None:
    # first check: one call (all text uncleared); then short 0.3 (not clearly safe) -> full safe: released;
    # short unsafe -> full safe: released; short 0.3 -> full unsafe: blocked
    judge = ScoredJudge([(True, 0.0), (True, 0.3), (True, 0.1), (False, 0.9), (True, 0.2), (True, 0.3),
                         (False, 0.8)])
    guard = text_stream_guard(judge, window=2, context_chars=10, prefilter_chars=4, prefilter_below=0.02)
    await guard.feed("abcd")
    assert await guard.feed("efgh") == ["abcd", "efgh"]
    assert judge.seen == ["abcdefgh"]
    await guard.feed("ij")
    assert await guard.feed("kl") == ["ij", "kl"]
    assert judge.seen[1:] == ["ijkl", "cdefghijkl"]  # short, then the full 10-character context
    await guard.feed("mn")
    assert await guard.feed("op") == ["mn", "op"]  # the short tail's unsafe verdict is not final
    assert judge.seen[3:] == ["mnop", "ghijklmnop"]
    await guard.feed("qr")
    assert await guard.feed("st") == []
    assert guard.blocked and judge.seen[5:] == ["qrst", "klmnopqrst"]
    assert guard.stats.prefilter_passes == 0 and guard.stats.judge_calls == 7


async def test_each_check_reports_one_deciding_verdict_and_how_it_was_read() -> None:
    # check 1: one read (the short tail would be the whole text); check 2: settled by the short tail;
    # check 3: escalated (short 0.3), the full read decides and its latency covers both reads
    script = [(True, 0.0), (True, 0.001), (True, 0.3), (False, 0.9)]
    latencies = iter([0.001, 0.002, 0.004, 0.008])
    decisions: list[tuple[Verdict, str]] = []

    async def judge(text: str) -> Verdict:
        safe, score = script.pop(0)
        return Verdict(safe, () if safe else ("S1",), score, "fake", Stage.OUTPUT, latency=next(latencies))

    guard = text_stream_guard(judge, window=2, context_chars=10, prefilter_chars=4, prefilter_below=0.02,
                              on_decision=lambda v, read: decisions.append((v, read)))
    for piece in ("abcd", "efgh", "ij", "kl", "mn", "op"):
        await guard.feed(piece)
    assert [read for _, read in decisions] == ["full", "prefilter", "escalated"]
    assert [v.score for v, _ in decisions] == [0.0, 0.001, 0.9]
    assert decisions[2][0].latency == pytest.approx(0.012) and guard.verdict == decisions[2][0]
    assert guard.blocked
    s = guard.stats
    assert (s.checks, s.judge_calls, s.prefilter_passes, s.prefilter_escalations) == (3, 4, 1, 1)


async def test_prefilter_error_verdict_escalates() -> None:
    calls: list[str] = []

    async def judge(text: str) -> Verdict:
        calls.append(text)
        return Verdict(True, (), 0.0, "error", Stage.OUTPUT, error=True) if len(calls) == 2 else SAFE

    guard = text_stream_guard(judge, window=4, context_chars=8, prefilter_chars=2, prefilter_below=0.5)
    for piece in "abcd":
        await guard.feed(piece)
    for piece in "efgh":
        await guard.feed(piece)
    assert calls == ["abcd", "efgh", "abcdefgh"]  # a fail-open error verdict never settles a check alone


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["", "a", "bc", " ", "é", "long piece of text"]), max_size=30),
    script=st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.01, 0.3, 0.9])), max_size=16),
    window=st.integers(min_value=1, max_value=6),
    context_chars=st.none() | st.integers(min_value=1, max_value=40),
    prefilter_chars=st.integers(min_value=1, max_value=20),
)
def test_prefilter_never_releases_text_no_deciding_safe_verdict_covered(
        pieces: list[str], script: list[tuple[bool, float]], window: int, context_chars: int | None,
        prefilter_chars: int) -> None:
    async def run() -> None:
        judge = ScoredJudge(list(script))
        guard = text_stream_guard(judge, window=window, first_window=1, context_chars=context_chars,
                                  prefilter_chars=prefilter_chars, prefilter_below=0.02)
        fed, released, cleared = "", "", ""
        blocked = False

        async def step(call: object) -> None:
            nonlocal cleared, blocked, released
            before = len(judge.seen)
            out = await call  # type: ignore[misc]
            items = out if isinstance(out, list) else out[0]
            calls = judge.seen[before:]
            assert len(calls) <= 2
            for asked in calls:  # every call reads all uncleared text, as a suffix of what was generated
                assert fed.endswith(asked) and len(asked) >= len(fed) - len(cleared)
            if calls:
                i = len(judge.seen) - 1  # the last call of a check decides it
                safe = script[i][0] if i < len(script) else True
                if len(calls) == 2:
                    first = script[before] if before < len(script) else (True, 0.0)
                    assert not (first[0] and first[1] < 0.02)  # a clearly safe short tail would have settled it
                    assert len(calls[0]) < len(calls[1])
                if safe and not blocked:
                    cleared = fed
                else:
                    blocked = True
            released += "".join(items)
            assert cleared.startswith(released)  # released text is covered by a deciding safe verdict
            if blocked:
                assert not items

        for piece in pieces:
            fed += piece
            await step(guard.feed(piece))
        await step(guard.finish())
        assert guard.blocked == blocked

    asyncio.run(run())
