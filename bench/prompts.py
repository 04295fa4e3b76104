"""Deterministic benchmark prompts: plain prose, cut to an exact token count by each system's own tokenizer.

Standard library only: imported by the peer workers, which run in the bench venv without the project.
The text is original (written for this benchmark), plain continuation prose rather than a chat turn, so
greedy decoding tends to keep going instead of closing a reply with EOS after a few sentences.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

PARAGRAPHS: tuple[str, ...] = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the "
    "spiral stair with a lantern in one hand and a tin of oil in the other, counting the steps out of habit.",
    "At the top the great lens waited under its canvas hood. He pulled the cover away, wiped the brass "
    "fittings with a soft cloth, and checked the wick before the first grey light reached the water.",
    "Below him the harbour was still asleep. Fishing boats rocked at their moorings, their masts ticking "
    "against the sky, and a single gull walked along the sea wall looking for something it had lost.",
    "His daughter had written from the city again. She described trams and bookshops, crowded markets, "
    "and a bridge of iron that hummed when the wind blew from the north across the wide grey river.",
    "He kept her letters in a wooden box beside the logbook. In the evenings he read them twice, once "
    "quickly for the news and once slowly for the sound of her voice, which he could almost hear.",
    "The logbook itself was a plain ledger bound in green cloth. Each line held the date, the weather, "
    "the ships that passed, and any repairs he had made to the lamp, the stair, or the iron railing.",
    "Winter storms were the hardest. Waves broke over the rocks and threw spray as high as the gallery, "
    "and the whole tower shuddered while he trimmed the flame and watched the dark for a passing hull.",
    "In spring the village children came out along the causeway at low tide. They asked him how far the "
    "beam could reach, and he told them it touched ships that could not yet see the land at all.",
    "The new inspector arrived in a motor launch with papers about electric lamps and automatic clocks. "
    "He spoke kindly, measured the gallery twice, and wrote many careful notes in a small black book.",
    "That night the keeper sat a long time by the window. He thought about the lens and the stair, the "
    "letters in the box, and the city bridge that sang in the wind, and he began to write a reply.",
)

# Enough prose for the longest prompt (512 tokens) from any starting paragraph: ~45 tokens a paragraph.
_REPEATS = 3


def prompt_text(stream_index: int) -> str:
    """The prose for one stream: the paragraphs rotated by the stream index, so concurrent streams differ
    from their first token (no system can share a prefix between them).

    Args:
        stream_index: 0 for single-stream measurements; i for the i-th concurrent stream.

    Returns:
        A text long enough to yield more than 512 tokens.
    """
    start = stream_index % len(PARAGRAPHS)
    order = PARAGRAPHS[start:] + PARAGRAPHS[:start]
    # The numbered heading keeps streams 0 and len(PARAGRAPHS) apart as well.
    return f"Chapter {stream_index + 1}.\n\n" + "\n\n".join(order * _REPEATS)


def prompt_ids(encode: Callable[[str], Sequence[int]], stream_index: int, n_tokens: int) -> list[int]:
    """Tokenize a stream's prose with a system's own tokenizer and keep exactly `n_tokens` ids.

    Args:
        encode: the system's plain encoder (no BOS, special tokens as text).
        stream_index: which stream's prose (see `prompt_text`).
        n_tokens: the exact prompt length.

    Returns:
        The first `n_tokens` ids.

    Raises:
        ValueError: when the text is shorter than `n_tokens` tokens.
    """
    ids = list(encode(prompt_text(stream_index)))
    if len(ids) < n_tokens:
        raise ValueError(f"prompt text gives {len(ids)} tokens, fewer than the {n_tokens} needed")
    return ids[:n_tokens]


def ids_digest(ids: Sequence[int]) -> str:
    """A short stable digest of a token id list, to check that every system ran the same prompt.

    Args:
        ids: token ids.

    Returns:
        The first 16 hex digits of the SHA-256 of the comma-joined ids.
    """
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
