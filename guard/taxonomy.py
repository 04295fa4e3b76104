"""The Llama Guard 3 hazard taxonomy (S1-S14) as data, plus deployment-defined custom categories.

Codes are stable identifiers: excluding a category removes its line from the guard prompt but never
renumbers the others (llama-stack semantics), and custom categories take fresh codes (S15, S16, ... by
default, or a deployment's own such as "FRAUD1").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A code must survive two syntaxes unchanged: the prompt's "CODE: Name." lines and the verdict's
# comma-separated "S1,S9" list, so it may hold neither ':' nor ',' nor whitespace. Upper case only so
# that the strict verdict parser never has to guess about case.
CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,15}")
_S_CODE_RE = re.compile(r"S([0-9]+)")
_NUMBERED_CODE_RE = re.compile(r"([A-Z_]*?)([0-9]+)")

# Text the prompt builder uses as structure. Category names and descriptions come from deployment
# config (trusted), but a typo there must not be able to break the prompt either.
_FORBIDDEN_FRAGMENTS = ("<|", "<BEGIN", "<END")
_CATEGORY_LINE_RE = re.compile(r"^\s*[A-Z][A-Z0-9_]{0,15}\s*:", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Category:
    """One hazard category.

    Args:
        code: stable identifier such as "S1"; what verdicts carry and metrics are labelled with.
        name: the name exactly as written in the guard prompt, without the trailing '.' the prompt adds.
        long_name: the model-card name (e.g. "Sex-Related Crimes" for S3); defaults to `name`.
        description: text rendered on the lines after "CODE: Name." in the prompt. Empty for S1-S14,
            because Llama Guard 3 was trained on the bare names; custom categories should describe
            themselves, since the model has never seen them.
    """

    code: str
    name: str
    long_name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not CODE_RE.fullmatch(self.code):
            raise ValueError(f"category code must match {CODE_RE.pattern}, got {self.code!r}")
        name = self.name
        if not name or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"category {self.code} name must be one non-empty stripped line")
        if name.endswith("."):
            raise ValueError(f"category {self.code} name must not end with '.' (the prompt adds it)")
        if self.description != self.description.strip():
            raise ValueError(f"category {self.code} description must be stripped")
        if _CATEGORY_LINE_RE.search(self.description):
            raise ValueError(f"category {self.code} description must not contain 'CODE:' lines")
        for text in (name, self.long_name, self.description):
            for fragment in _FORBIDDEN_FRAGMENTS:
                if fragment in text.upper():
                    raise ValueError(f"category {self.code} text must not contain {fragment!r}")

    @property
    def display_name(self) -> str:
        """The model-card name when there is one, else the prompt name."""
        return self.long_name or self.name


CATEGORIES: tuple[Category, ...] = (
    Category("S1", "Violent Crimes"),
    Category("S2", "Non-Violent Crimes"),
    Category("S3", "Sex Crimes", long_name="Sex-Related Crimes"),
    Category("S4", "Child Exploitation", long_name="Child Sexual Exploitation"),
    Category("S5", "Defamation"),
    Category("S6", "Specialized Advice"),
    Category("S7", "Privacy"),
    Category("S8", "Intellectual Property"),
    Category("S9", "Indiscriminate Weapons"),
    Category("S10", "Hate"),
    Category("S11", "Self-Harm", long_name="Suicide & Self-Harm"),
    Category("S12", "Sexual Content"),
    Category("S13", "Elections"),
    Category("S14", "Code Interpreter Abuse"),
)
BUILTIN_CODES: tuple[str, ...] = tuple(c.code for c in CATEGORIES)
# Llama-Guard-3-1B was trained on S1-S13 only; S14 is meaningful for the 8B model.
LLAMA_GUARD_3_1B_CODES: tuple[str, ...] = BUILTIN_CODES[:13]

_BY_CODE = {c.code: c for c in CATEGORIES}


def get_category(code: str) -> Category:
    """Look up a built-in category.

    Args:
        code: "S1" ... "S14".

    Returns:
        The category. Raises KeyError for any other code.
    """
    try:
        return _BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown built-in category code {code!r}") from None


def is_builtin(code: str) -> bool:
    """True for "S1" ... "S14"."""
    return code in _BY_CODE


def code_sort_key(code: str) -> tuple[str, int, str]:
    """Natural order for codes: S2 before S10, built-in S codes before a deployment's own prefixes.

    Args:
        code: any category code.

    Returns:
        A key for `sorted`.
    """
    match = _NUMBERED_CODE_RE.fullmatch(code)
    if match is None:
        return (code, -1, code)
    prefix = "" if match.group(1) == "S" else match.group(1)
    return (prefix, int(match.group(2)), code)


def sort_codes(codes: Iterable[str]) -> tuple[str, ...]:
    """Sorted in natural order, duplicates removed.

    Args:
        codes: category codes.

    Returns:
        A tuple such as ("S1", "S2", "S10").
    """
    return tuple(sorted(set(codes), key=code_sort_key))


def next_code(taken: Iterable[str]) -> str:
    """The first S code after every S code in `taken` (S15 after the built-ins).

    Args:
        taken: codes already in use (built-in codes are always considered taken).

    Returns:
        A fresh code.
    """
    numbers = [int(m.group(1)) for code in (*BUILTIN_CODES, *taken) if (m := _S_CODE_RE.fullmatch(code))]
    return f"S{max(numbers) + 1}"


def custom_categories(specs: Sequence[tuple[str, str]], taken: Iterable[str] = ()) -> tuple[Category, ...]:
    """Custom categories from (name, description) pairs, numbered after the built-ins and `taken`.

    Args:
        specs: (name, description) for each category, in prompt order.
        taken: codes already used by other custom categories.

    Returns:
        Categories with codes S15, S16, ... (or after the highest taken S code).
    """
    used = list(taken)
    out: list[Category] = []
    for name, description in specs:
        code = next_code(used)
        used.append(code)
        out.append(Category(code, name, description=description))
    return tuple(out)
