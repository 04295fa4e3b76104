"""StopChecker: EOS, stop strings across token boundaries, held-back text, length limits."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.engine.stopping import StopChecker, StopResult
from service.engine.types import FinishReason

EOS = 2
TOKEN = 7  # any non-EOS id


def checker(stop: Sequence[str] = (), max_new_tokens: int = 100, left: int = 1000) -> StopChecker:
    return StopChecker(stop, frozenset({EOS}), max_new_tokens, left)


def feed(c: StopChecker, pieces: Sequence[str]) -> list[StopResult]:
    return [c.push(TOKEN, p) for p in pieces]


def test_without_stop_strings_text_passes_straight_through() -> None:
    c = checker()
    assert feed(c, ["Hel", "lo"]) == [StopResult("Hel", None), StopResult("lo", None)]


def test_eos_finishes_releases_held_text_and_drops_its_own_text() -> None:
    c = checker(stop=["###"])
    assert c.push(TOKEN, "a#") == StopResult("a", None)  # "#" could start "###"
    assert c.held == "#"
    assert c.push(EOS, "<|im_end|>") == StopResult("#", FinishReason.EOS)


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    c = checker(stop=["\nUser:"])
    results = feed(c, ["Hello", "\nUs", "er", ": more"])
    assert [r.emit for r in results] == ["Hello", "", "", ""]
    assert results[-1].finish is FinishReason.STOP_SEQUENCE


def test_stop_string_inside_one_token_emits_the_text_before_it() -> None:
    c = checker(stop=["STOP"])
    assert c.push(TOKEN, "foo STOP bar") == StopResult("foo ", FinishReason.STOP_SEQUENCE)


def test_held_text_is_released_once_it_cannot_be_a_stop_string() -> None:
    c = checker(stop=["abc"])
    assert c.push(TOKEN, "xa") == StopResult("x", None)
    assert c.push(TOKEN, "b") == StopResult("", None)
    assert c.held == "ab"
    assert c.push(TOKEN, "d") == StopResult("abd", None)
    assert c.held == ""


def test_overlapping_prefix_holds_only_the_longest_candidate() -> None:
    c = checker(stop=["aab"])
    results = feed(c, ["a", "a", "a", "b"])
    assert [r.emit for r in results] == ["", "", "a", ""]
    assert results[-1].finish is FinishReason.STOP_SEQUENCE


def test_the_stop_string_that_completes_first_wins() -> None:
    # "bc" ends before "abcd" does, whether the text comes in one token or in two
    one = checker(stop=["abcd", "bc"])
    assert one.push(TOKEN, "xabcd") == StopResult("xa", FinishReason.STOP_SEQUENCE)
    two = checker(stop=["abcd", "bc"])
    assert two.push(TOKEN, "xabc") == StopResult("xa", FinishReason.STOP_SEQUENCE)


def test_same_end_prefers_the_longer_stop_string() -> None:
    c = checker(stop=["b", "ab"])
    assert c.push(TOKEN, "xab") == StopResult("x", FinishReason.STOP_SEQUENCE)


def test_max_new_tokens_finishes_with_length_and_releases_held_text() -> None:
    c = checker(stop=["##"], max_new_tokens=2)
    assert c.push(TOKEN, "x") == StopResult("x", None)
    assert c.push(TOKEN, "#") == StopResult("#", FinishReason.LENGTH)


def test_context_limit_finishes_before_max_new_tokens() -> None:
    c = checker(max_new_tokens=10, left=2)
    assert feed(c, ["a", "b"]) == [StopResult("a", None), StopResult("b", FinishReason.LENGTH)]


def test_stop_string_and_eos_take_precedence_over_length_on_the_same_token() -> None:
    c = checker(stop=["!"], max_new_tokens=1)
    assert c.push(TOKEN, "hi!") == StopResult("hi", FinishReason.STOP_SEQUENCE)
    c = checker(max_new_tokens=1)
    assert c.push(EOS, "</s>") == StopResult("", FinishReason.EOS)


def test_flush_returns_held_text_and_ends_the_sequence() -> None:
    c = checker(stop=["<end>"])
    assert c.push(TOKEN, "ok <en") == StopResult("ok ", None)
    assert c.flush() == "<en"
    with pytest.raises(RuntimeError, match="after the sequence finished"):
        c.push(TOKEN, "x")


def test_push_after_finish_raises() -> None:
    c = checker()
    c.push(EOS, "")
    with pytest.raises(RuntimeError):
        c.push(TOKEN, "x")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop": ["ok", ""]}, "stop[1] must not be empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"left": 0}, "max_total_tokens_left must be >= 1, got 0"),
    ],
)
def test_constructor_rejects_unusable_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        checker(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def expected_output(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Reference: the stop that completes first (ties: the longest) cuts the text at its start."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s) : end] == s]
        if starts:
            return text[: min(starts)], True
    return text, False


@given(
    text=st.text(alphabet="ab\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
)
def test_any_split_into_tokens_gives_the_reference_output(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    c = checker(stop=stops)
    emitted, finish = "", None
    for piece in pieces:
        result = c.push(TOKEN, piece)
        emitted += result.emit
        assert len(c.held) < max(map(len, stops))  # the window never grows with the output
        if result.finish is not None:
            finish = result.finish
            break
    else:
        emitted += c.flush()
    want, stopped = expected_output(text, stops)
    assert emitted == want
    assert (finish is FinishReason.STOP_SEQUENCE) == stopped
