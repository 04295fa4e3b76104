"""Decoded views of obfuscated text, so that an encoded request is judged as the request it encodes.

Jailbreaks hide a payload from a text classifier by encoding it: base64, leetspeak ("h0w d0 1 m4k3"), text
written backwards, in ROT13 or in Pig Latin, letters spelled apart ("b-o-m-b"). The classifier reads
surface words, so on our `mixed_prompts` evaluation set such payloads scored 0.01-0.40 (docs/GUARD.md).
`decoded_views(text)` returns the text with each encoding it finds undone, and an empty list for ordinary
text (no extra encoder call). The moderator judges the views next to the original text and the worst one
decides, so decoding can only make a verdict stricter. Every detector is conservative: it must find a
decoding that reads as text, not just characters that could be one (hashes, identifiers, version strings
and acronyms stay as they are).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Sequence

# a run of base64 alphabet long enough to carry a request; `=` padding optional
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/]{12,}={0,2}(?![A-Za-z0-9+/=_-])")
# digits and symbols that stand for letters in leetspeak
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s"})
_WORD = re.compile(r"[A-Za-z0-9@$]+")
_LEET_MARK = re.compile(r"[A-Za-z][0134578@$]|[0134578@$][A-Za-z]")
# four or more single letters joined by one separator each: b-o-m-b, k.i.l.l, p o i s o n; a space in the
# chain is a word break ("h-o-w- -t-o")
_SPELLED = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]([-._* ])(?:[A-Za-z ]\1){2,}[A-Za-z](?![A-Za-z0-9])")
# two single letters joined by a separator: every spelled-out form has one (a cheap test before the patterns)
_SPELLED_PAIR = re.compile(r"(?<![A-Za-z0-9])[A-Za-z][-._* ][A-Za-z](?![A-Za-z0-9])")
# one word spelled out with a separator (b-o-m-b, t-o), per separator
_SPELLED_WORDS = {sep: re.compile(rf"(?<![\w{e}])[A-Za-z](?:{e}[A-Za-z])+(?![\w{e}])")
                  for sep, e in ((s, re.escape(s)) for s in "-.*_")}
# segments that may be reversed independently ("reverse this and answer: ?...")
_SEGMENT = re.compile(r"[^\n:\"“”]+")
# a segment that reads as English may still end in an encoded sentence ("What does this say? Ubj qb V ..."):
# sentences start after end punctuation and a space (reversed text keeps its punctuation before the space)
_SENTENCE = re.compile(r"(?<=[.?!])\s+")
# frequent English words; decoded text is recognised by them
_FREQUENT_WORDS = (
    "the and for with from how what why where who which you your can does make get give tell write show find "
    "best way need want kill buy use this that are was have has into about will would should could know help "
    "please answer question people someone step steps home money without them they there their when all not "
    "any some more most just like out one time good new first also here only other then than because after "
    "before over under very much many every each our his her she him its send old year "
    "me my to do is in of it an at be so or up we us he if go am no on")
_FREQUENT = frozenset(_FREQUENT_WORDS.split())
# a word counts only when its reversal is not also one ("no"/"on", "now"/"won") and it is not a palindrome
_COMMON = frozenset(w for w in _FREQUENT if w[::-1] not in _FREQUENT and w != w[::-1])

MIN_BASE64_ALIGNED = 16  # a run re-aligned (cut out of a longer one) must keep this many characters
MIN_SPELLED_WORDS = 3  # words spelled out one by one: at least this many (not "A-B testing")
MIN_LEET_WORDS = 3  # leetspeak needs this many substituted words, making up ...
MIN_LEET_SHARE = 0.3  # ... this share of the words that have letters, and ...
MIN_DECODED_COMMON = 2  # ... (as for reversed text) this many frequent words must appear once decoded
MIN_COMMON_SHARE = 0.2  # reversed segment: share of frequent words once reversed ...
MAX_COMMON_SHARE = 0.05  # ... and at most this share as written, or at most ...
MAX_COMMON_SHARE_RATIO = 0.15  # ... this share when undoing the segment triples it (ROT13 maps "be" to "or")


def _readable_base64(token: str) -> str | None:
    """`token` decoded, when it is base64 of readable UTF-8 text."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    letters = sum(c.isalpha() for c in text)
    printable = sum(c.isprintable() or c in "\n\t" for c in text)
    if len(text) < 4 or printable < len(text) or letters < 0.6 * len(text.replace(" ", "")):
        return None
    return text


def _decoded_base64(token: str) -> str | None:
    """The text a base64 token encodes, or None when it does not decode to readable text.

    A run cut out of a longer one (an output check's tail starts anywhere in the answer, and the answer is
    still being written) is misaligned: when the whole token does not decode, its 4-character groups are
    tried from each of the first four offsets, with the incomplete last group dropped.
    """
    if token.isalpha() and (token.islower() or token.isupper()):
        return None  # a long ordinary word
    if (text := _readable_base64(token)) is not None:
        return text
    stripped = token.rstrip("=")
    for k in range(4):
        body = stripped[k : k + (len(stripped) - k) // 4 * 4]
        if len(body) >= MIN_BASE64_ALIGNED and body != token and (text := _readable_base64(body)) is not None:
            return text
    return None


def _base64_view(text: str) -> str | None:
    found = False

    def swap(m: re.Match[str]) -> str:
        nonlocal found
        decoded = _decoded_base64(m.group(0))
        if decoded is None:
            return m.group(0)
        found = True
        return decoded

    view = _BASE64.sub(swap, text)
    return view if found else None


def _leet_view(text: str) -> str | None:
    if not _LEET_MARK.search(text):
        return None  # no letter next to a digit or symbol anywhere: nothing substituted (most text)
    words = [w for w in _WORD.findall(text) if any(c.isalpha() for c in w)]
    leet = [w for w in words if _LEET_MARK.search(w)]
    if len(leet) < MIN_LEET_WORDS or len(leet) < MIN_LEET_SHARE * len(words):
        return None
    if sum(w.translate(_LEET).lower() in _COMMON for w in leet) < MIN_DECODED_COMMON:
        return None  # identifiers, chess or chemistry notation: nothing readable comes out

    def undo(m: re.Match[str]) -> str:
        word = m.group(0)
        plain = word.translate(_LEET)
        if _LEET_MARK.search(word) or len(word) == 1 or plain.lower() in _COMMON:
            return plain  # "m4k3"; a lone "4" or "1" (a, i); digit-only words that spell one ("70": to)
        return word  # other numbers: "13 year old" stays

    return _WORD.sub(undo, text)


def _common(segment: str) -> tuple[int, float]:
    """Frequent words in `segment`: the count of those with 3+ letters (short ones turn up by chance in
    reversed notation: "Eb - Ab" gives "bE") and the share of all of them among its words."""
    words = re.findall(r"[a-z']+", segment.lower())
    hits = [w for w in words if w in _COMMON]
    return sum(len(w) >= 3 for w in hits), len(hits) / len(words) if words else 0.0


_PIG = re.compile(r"\b([a-z]+)ay\b", re.I)
_CONSONANTS = frozenset("bcdfghjklmnpqrstvwxzBCDFGHJKLMNPQRSTVWXZ")


def _unpig_word(m: re.Match[str]) -> str:
    """One Pig Latin word back to English: "ombbay" -> "bomb", "itewray" -> "write", "iway" -> "i"."""
    base = m.group(1)
    candidates = [base[:-1]] if base[-1] in "wyWY" and len(base) > 1 else []  # vowel-initial words + "way"
    candidates += [base[-k:] + base[:-k] for k in (1, 2, 3)
                   if len(base) > k and all(c in _CONSONANTS for c in base[-k:])]
    known = [c for c in candidates if c.lower() in _COMMON]
    return (known or candidates or [m.group(0)])[0]


def _unpig(segment: str) -> str:
    return _PIG.sub(_unpig_word, segment)


# ways a segment can be written so that it reads as gibberish, each with the function that undoes it
_SEGMENT_DECODERS = ((lambda seg: seg[::-1]), (lambda seg: codecs.encode(seg, "rot13")), _unpig)


def _segment_view(text: str) -> str | None:
    """Segments written backwards, in ROT13 or in Pig Latin, undone: a segment is replaced when undoing it
    yields frequent English words and as written it has almost none."""
    found = False

    def undo_piece(seg: str) -> str | None:
        written = _common(seg)[1]
        if len(seg.split()) < 3 or written > MAX_COMMON_SHARE_RATIO:
            return None
        for decode in _SEGMENT_DECODERS:
            plain = decode(seg)
            hits, share = _common(plain)
            if hits >= MIN_DECODED_COMMON and share >= MIN_COMMON_SHARE and (
                    written <= MAX_COMMON_SHARE or share >= 3 * written):
                return plain
        return None

    def undo(m: re.Match[str]) -> str:
        nonlocal found
        seg = m.group(0)
        plain = undo_piece(seg)
        if plain is None and _SENTENCE.search(seg):  # the whole reads as English: its sentences one by one
            parts = _SENTENCE.split(seg)
            undone = [undo_piece(part) for part in parts]
            if any(u is not None for u in undone):
                plain = " ".join(u if u is not None else part for part, u in zip(parts, undone, strict=True))
        if plain is None:
            return seg
        found = True
        return plain

    view = _SEGMENT.sub(undo, text)
    return view if found else None


def _unspell(m: re.Match[str]) -> str:
    return "".join(c for c in m.group(0) if c.isalpha())


def _spelled_view(text: str) -> str | None:
    if not _SPELLED_PAIR.search(text):
        return None  # no single letter next to another across a separator: nothing spelled out (most text)
    found = False

    def join(m: re.Match[str]) -> str:
        nonlocal found
        letters = m.group(0).replace(m.group(1), "")
        if m.group(1) == "." and letters.isupper():
            return m.group(0)  # an acronym like U.S.A.F
        found = True
        return letters

    view = _SPELLED.sub(join, text)
    for sep, pattern in _SPELLED_WORDS.items():  # word by word: h-o-w t-o g-e-t (3+ such words)
        words = pattern.findall(view)
        if len(words) >= MIN_SPELLED_WORDS and not (sep == "." and all(w.isupper() for w in words)):
            view = pattern.sub(_unspell, view)
            found = True
    return view if found else None


def decoded_views(text: str) -> list[str]:
    """The text with each obfuscation found in it undone: one view per kind of encoding, then one with all.

    Args:
        text: a turn to be judged.

    Returns:
        Distinct views that differ from `text`; empty for ordinary text.
    """
    views: list[str] = []
    combined = text
    for decode in (_base64_view, _segment_view, _spelled_view, _leet_view):
        view = decode(text)
        if view is not None and view != text and view not in views:
            views.append(view)
        step = view if combined is text else decode(combined)  # nothing undone yet: the same input
        combined = step if step is not None else combined
    if combined != text and combined not in views:
        views.append(combined)
    return views


def with_decoded_views(texts: Sequence[str]) -> list[str]:
    """`texts` followed by the decoded views of each (see `decoded_views`).

    Args:
        texts: the turns to be judged.

    Returns:
        The texts, then every view; just the texts when nothing is encoded.
    """
    return [*texts, *(view for text in texts for view in decoded_views(text))]
