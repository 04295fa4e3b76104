"""parse_verdict: exactly 'safe' or 'unsafe\\n<codes>', nothing else."""

from __future__ import annotations

import pytest

from guard.prompt import VerdictParseError, parse_verdict

ACCEPTED = [
    ("safe", (True, ())),
    ("\n\nsafe", (True, ())),  # Llama Guard 3 when the prompt lacks the blank line after the header
    ("safe\n", (True, ())),
    (" safe \t", (True, ())),
    ("unsafe\nS1", (False, ("S1",))),
    ("unsafe\nS10,S2", (False, ("S2", "S10"))),  # natural order, not lexicographic
    ("\n\nunsafe\nS1,S9\n", (False, ("S1", "S9"))),
    ("unsafe\nS14", (False, ("S14",))),
]

REJECTED = [
    "",
    "   ",
    "Safe",
    "SAFE",
    "safe.",
    "safe\nS1",
    "safe\nunsafe",
    "unsafe",
    "unsafe\n",
    "unsafe\nS1,",
    "unsafe\n,S1",
    "unsafe\nS1, S9",
    "unsafe\nS1 ,S9",
    "unsafe\n S1",  # an inner blank is not surrounding whitespace
    "unsafe\r\nS1",
    "unsafe\nS1\nS2",
    "unsafe\n\nS1",
    "unsafe\nS1,S1",
    "unsafe\nS0",
    "unsafe\nS15",  # not in the known codes
    "unsafe\ns1",
    "unsafe\nO1",
    "unsafe\nS1;S2",
    "unsafe S1",
    "unsafe\nS1<|eot_id|>",
    "I think this is safe",
    "safe<|eot_id|>",
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_accepts(text: str, expected: tuple[bool, tuple[str, ...]]) -> None:
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text", REJECTED)
def test_rejects(text: str) -> None:
    with pytest.raises(VerdictParseError):
        parse_verdict(text)


def test_custom_codes_accepted_only_when_known() -> None:
    known = frozenset({"S1", "S15", "FRAUD1"})
    assert parse_verdict("unsafe\nFRAUD1,S15,S1", known) == (False, ("S1", "S15", "FRAUD1"))
    with pytest.raises(VerdictParseError):
        parse_verdict("unsafe\nS2", known)


def test_error_message_never_quotes_the_answer() -> None:
    secret = "my secret plan to rob a bank"
    with pytest.raises(VerdictParseError) as info:
        parse_verdict(secret)
    assert "secret" not in str(info.value)
    with pytest.raises(VerdictParseError) as info:
        parse_verdict(f"unsafe\n{secret}")
    assert "secret" not in str(info.value)
