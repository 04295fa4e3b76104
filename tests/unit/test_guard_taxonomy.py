"""The S1-S14 table and custom categories."""

from __future__ import annotations

import pytest

from guard.taxonomy import (
    BUILTIN_CODES,
    CATEGORIES,
    LLAMA_GUARD_3_1B_CODES,
    Category,
    custom_categories,
    get_category,
    next_code,
    sort_codes,
)


def test_prompt_names_are_the_reference_ones() -> None:
    # Copied from the reference's category paragraph (tests/fixtures/llama_guard3/llama_guard3.md).
    expected = (
        "S1: Violent Crimes. S2: Non-Violent Crimes. S3: Sex Crimes. S4: Child Exploitation. "
        "S5: Defamation. S6: Specialized Advice. S7: Privacy. S8: Intellectual Property. "
        "S9: Indiscriminate Weapons. S10: Hate. S11: Self-Harm. S12: Sexual Content. S13: Elections. "
        "S14: Code Interpreter Abuse."
    )
    assert " ".join(f"{c.code}: {c.name}." for c in CATEGORIES) == expected
    assert all(c.description == "" for c in CATEGORIES)  # the model was trained on bare names


def test_model_card_long_names() -> None:
    assert get_category("S3").display_name == "Sex-Related Crimes"
    assert get_category("S4").display_name == "Child Sexual Exploitation"
    assert get_category("S11").display_name == "Suicide & Self-Harm"
    assert get_category("S1").display_name == "Violent Crimes"


def test_codes() -> None:
    assert tuple(f"S{i}" for i in range(1, 15)) == BUILTIN_CODES
    assert tuple(f"S{i}" for i in range(1, 14)) == LLAMA_GUARD_3_1B_CODES
    with pytest.raises(KeyError):
        get_category("S15")


def test_sort_codes_is_natural_and_dedupes() -> None:
    assert sort_codes(["S10", "S2", "S1", "S2", "FRAUD1", "S15"]) == ("S1", "S2", "S10", "S15", "FRAUD1")


def test_custom_categories_continue_after_s14() -> None:
    cats = custom_categories([("Gambling", "No betting."), ("Spam", "No bulk mail.")])
    assert [c.code for c in cats] == ["S15", "S16"]
    assert [c.code for c in custom_categories([("X", "x")], taken=["S15", "S20"])] == ["S21"]
    assert next_code(["FRAUD1"]) == "S15"


@pytest.mark.parametrize(
    ("code", "name", "description"),
    [
        ("s15", "Lower", ""),
        ("S 15", "Space", ""),
        ("S15,S16", "Comma", ""),
        ("S15:", "Colon", ""),
        ("S15", "", ""),
        ("S15", "Two\nlines", ""),
        ("S15", "Dotted.", ""),
        ("S15", " Padded", ""),
        ("S15", "Name", " padded "),
        ("S15", "Name", "<BEGIN CONVERSATION>"),
    ],
)
def test_invalid_categories_raise(code: str, name: str, description: str) -> None:
    with pytest.raises(ValueError):
        Category(code, name, description=description)


def test_deployment_codes_allowed() -> None:
    cat = Category("FRAUD1", "Fraud", description="AI models should not help defraud people.")
    assert cat.display_name == "Fraud"
