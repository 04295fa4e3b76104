"""Streaming detokenization: one token id in, the newly completed text out.

Byte-level BPE can split one multi-byte character across tokens ("🙂" is 4 bytes, often 2-3 tokens).
Decoding each token alone would emit U+FFFD halves. Like mlx-lm's `BPEStreamingDetokenizer`, we work
on the bytes each token stands for and feed them to an incremental UTF-8 decoder, which holds back an
incomplete trailing character until its last byte arrives. Cost per token is O(bytes of that token),
independent of how long the sequence already is, and the concatenated output equals
`Tokenizer.decode(all_ids)`: invalid bytes become U+FFFD exactly where a whole-sequence decode puts them.
"""

from __future__ import annotations

import codecs

from service.text.tokenizer import Tokenizer


class StreamingDetokenizer:
    """Per-request incremental decoder. Not thread-safe: one instance belongs to one request."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        """Start an empty stream.

        Args:
            tokenizer: the model's tokenizer (shared, read-only).
            skip_special_tokens: drop special tokens instead of emitting their text.
        """
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        # errors="replace" mirrors the Rust decoder's from_utf8_lossy (one U+FFFD per maximal invalid run).
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Append one token.

        Args:
            token_id: the next generated id.

        Returns:
            Text completed by this token; "" while a character is still incomplete.
        """
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream.

        Returns:
            Whatever was held back: U+FFFD for a character whose last bytes never came, else "".
        """
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
