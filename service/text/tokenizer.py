"""Text <-> token ids for a model folder (`tokenizer.json` + `tokenizer_config.json`).

Prompt-injection boundary: only text the server itself rendered (a trusted `Segment`) may turn
special-token strings such as `<|im_start|>` into control tokens. User and message text is always
tokenized with special tokens inert, so a user typing `<|im_start|>` gets the ids of those characters.

Thread safety: one `tokenizers.Tokenizer` is configured once (`encode_special_tokens = True`) and never
mutated afterwards; trusted special tokens are cut out by our own compiled regex. Nothing toggles a
shared flag per call, so any number of threads may share one `Tokenizer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a rendered prompt.

    Args:
        text: the characters.
        trusted: True for the server's own template text (special-token strings become control tokens);
            False for user/message text (special-token strings stay plain text).
    """

    text: str
    trusted: bool


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable char standing for each byte -> that byte.

    Returns:
        A 256-entry map (bytes that are printable Latin-1 stand for themselves, the rest are shifted
        to U+0100 and up, e.g. "Ġ" is the space byte).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _token_bytes(token: str, table: dict[str, int]) -> bytes:
    # Same rule as the HF ByteLevel decoder: map every char through the alphabet, and if any char is not
    # in it (an added token such as "<|im start|>" with a real space), use the token's own UTF-8.
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _bytes_by_id(vocab: dict[str, int], size: int) -> tuple[bytes, ...]:
    table = byte_decoder()
    by_id: list[bytes | None] = [None] * size
    for token, token_id in vocab.items():
        by_id[token_id] = _token_bytes(token, table)
    missing = [i for i, b in enumerate(by_id) if b is None]
    if missing:
        raise ValueError(f"tokenizer has no token for {len(missing)} ids, first {missing[0]}")
    return tuple(b for b in by_id if b is not None)


class Tokenizer:
    """Byte-level BPE tokenizer of one model folder. Safe to share between threads."""

    def __init__(self, hf: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
        """Wrap a loaded HF tokenizer; use `from_dir` in normal code.

        Args:
            hf: a tokenizer whose decoder is ByteLevel; it is reconfigured here and must not be shared.
            config: the parsed `tokenizer_config.json` (names/ids of bos/eos, chat_template).
        """
        # Streaming detokenization works on the bytes each token stands for, which only ByteLevel defines.
        if not isinstance(hf.decoder, tokenizers.decoders.ByteLevel):
            raise ValueError(f"only byte-level BPE tokenizers are supported, decoder is {hf.decoder!r}")
        hf.encode_special_tokens = True  # set once, before any sharing: specials inert by default
        self._hf = hf
        self._vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        added = hf.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._special_by_text = {added[i].content: i for i in self._special_ids}
        # Longest first, so a special token that prefixes another never wins (leftmost-longest, as HF).
        alternatives = sorted(self._special_by_text, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._bos_id = self._config_id(config, "bos_token")
        self._eos_id = self._config_id(config, "eos_token")
        eos_ids = {int(i) for i in config.get("eos_token_ids") or ()}
        self._eos_ids = frozenset(eos_ids | ({self._eos_id} if self._eos_id is not None else set()))
        template = config.get("chat_template")
        self._chat_template = template if isinstance(template, str) else None
        self._bytes = _bytes_by_id(hf.get_vocab(with_added_tokens=True), self._vocab_size)

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Load `tokenizer.json` and `tokenizer_config.json` from a model folder.

        Args:
            model_dir: the folder written by the converter (or an official export).

        Returns:
            The tokenizer.
        """
        hf = tokenizers.Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        config_path = model_dir / TOKENIZER_CONFIG_FILE
        config: dict[str, Any] = {}
        if config_path.exists():
            with config_path.open(encoding="utf-8") as f:
                config = json.load(f)
        return cls(hf, config)

    def _config_id(self, config: dict[str, Any], key: str) -> int | None:
        # HF configs name the token ("bos_token": "<|im_start|>" or {"content": ...}); ours also give the
        # id. When both are present they must agree, or the folder is inconsistent.
        name = config.get(key)
        if isinstance(name, dict):
            name = name.get("content")
        by_name = self.token_to_id(name) if isinstance(name, str) else None
        explicit = config.get(f"{key}_id")
        if explicit is not None and by_name is not None and int(explicit) != by_name:
            raise ValueError(f"{key}_id {explicit} does not match {key} {name!r} (id {by_name})")
        return int(explicit) if explicit is not None else by_name

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens."""
        return self._special_ids

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id from tokenizer_config.json, if any."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id from tokenizer_config.json, if any."""
        return self._eos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends a turn (eos plus eot/eom where the model has them)."""
        return self._eos_ids

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, if the folder has one."""
        return self._chat_template

    def encode_plain(self, text: str) -> list[int]:
        """Tokenize untrusted text: special-token strings stay plain characters. No BOS is added.

        Args:
            text: user or message text.

        Returns:
            Token ids.
        """
        # encode_batch releases the GIL while the Rust tokenizer works (encode does not), so a huge prompt
        # tokenized in a worker thread does not stall the asyncio loop.
        return list(self._hf.encode_batch([text], add_special_tokens=False)[0].ids)

    def encode_trusted(self, text: str) -> list[int]:
        """Tokenize server-rendered text: special-token strings become their control ids. No BOS added.

        Args:
            text: template text the server produced itself.

        Returns:
            Token ids.
        """
        return self.encode_segments((Segment(text, trusted=True),))

    def encode_segments(self, segments: Sequence[Segment]) -> list[int]:
        """Tokenize a rendered prompt made of trusted and untrusted pieces.

        Text between control tokens is tokenized as one run even across segment borders, so the ids
        equal tokenizing the joined string with specials parsed only where the server put them.

        Args:
            segments: the prompt in order.

        Returns:
            Token ids.
        """
        ids: list[int] = []
        pending: list[str] = []
        for part in self._parts(segments):
            if isinstance(part, str):
                pending.append(part)
                continue
            if pending:
                ids.extend(self.encode_plain("".join(pending)))
                pending.clear()
            ids.append(part)
        if pending:
            ids.extend(self.encode_plain("".join(pending)))
        return ids

    def _parts(self, segments: Sequence[Segment]) -> Iterator[str | int]:
        for segment in segments:
            if not segment.trusted or self._special_re is None:
                yield segment.text
                continue
            start = 0
            for match in self._special_re.finditer(segment.text):
                yield segment.text[start : match.start()]
                yield self._special_by_text[match.group()]
                start = match.end()
            yield segment.text[start:]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Turn ids back into text (special tokens as their text unless skipped).

        Args:
            ids: token ids.
            skip_special_tokens: drop special tokens.

        Returns:
            The text; invalid UTF-8 becomes U+FFFD.
        """
        for token_id in ids:
            self._check_id(token_id)
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a piece of UTF-8, possibly not a whole character).

        Args:
            token_id: a token id.

        Returns:
            The bytes `decode` would produce for this token within a sequence.
        """
        self._check_id(token_id)
        return self._bytes[token_id]

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocab form, e.g. "Ġthe" or "<|im_end|>"), or None."""
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None when out of range."""
        return self._hf.id_to_token(token_id) if 0 <= token_id < self._vocab_size else None

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id must be in [0, {self._vocab_size}), got {token_id}")
