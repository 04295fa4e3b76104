"""GGUF tokenizer metadata -> Hugging Face `tokenizer.json` + `tokenizer_config.json` (build time only).

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported: SmolLM2, Llama 3.x, Llama-Guard-3.
The pre-tokenizer is chosen by `tokenizer.ggml.pre` and copies the split regexes of llama.cpp
(`src/llama-vocab.cpp`, `llm_tokenizer_bpe`), applied in order as HF `Split(..., "isolated")` steps,
which is what llama.cpp's `unicode_regex_split` does with a list of regexes. No BOS is added by the
tokenizer: the chat template carries it, so one prompt never gets two.

Usage: `python -m tools.gguf_tokenizer MODEL.gguf OUT_DIR`
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

log = logging.getLogger(__name__)

# llama.cpp `llama_token_type` values stored in `tokenizer.ggml.token_type`.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split regexes per llama.cpp pre-tokenizer type, verbatim from `llm_tokenizer_bpe` (C++ escapes undone).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# LLAMA_VOCAB_PRE_TYPE_LLAMA3: HF's `(?i:'s|...)` spelled without the inline flag, as llama.cpp adapted it
# (same splits; also keeps Unicode case folding from matching an apostrophe + U+017F).
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (GPT2_REGEX,),
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit on its own, then GPT-2 (HF: Digits(individual) + ByteLevel).
    "smollm": (r"\p{N}", GPT2_REGEX),
    **{name: (LLAMA3_REGEX,) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
}
# llama.cpp sets `ignore_merges` for the LLAMA3 group: a pre-token already in the vocab is one token
# (HF Llama 3 tokenizer.json says the same with `"ignore_merges": true`).
IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})


@dataclass(frozen=True, slots=True)
class GGUFTokenizerMeta:
    """The tokenizer part of a GGUF's metadata, as plain Python values."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    add_bos: bool | None = None
    chat_template: str | None = None


def _contents(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _optional_int(reader: gguf.GGUFReader, key: str) -> int | None:
    value = _contents(reader, key)
    return None if value is None else int(value)


def read_tokenizer_meta(reader: gguf.GGUFReader) -> GGUFTokenizerMeta:
    """Read the `tokenizer.*` keys of a GGUF.

    Args:
        reader: an open GGUF.

    Returns:
        The metadata; `pre` is "default" when the GGUF names none (as llama.cpp assumes).
    """
    pre = _contents(reader, "tokenizer.ggml.pre")
    if pre is None:
        log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
    add_bos = _contents(reader, "tokenizer.ggml.add_bos_token")
    return GGUFTokenizerMeta(
        model=str(_contents(reader, "tokenizer.ggml.model")),
        pre=str(pre) if pre is not None else "default",
        tokens=tuple(_contents(reader, "tokenizer.ggml.tokens") or ()),
        token_types=tuple(int(t) for t in _contents(reader, "tokenizer.ggml.token_type") or ()),
        merges=tuple(_contents(reader, "tokenizer.ggml.merges") or ()),
        bos_id=_optional_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_optional_int(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=_optional_int(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_optional_int(reader, "tokenizer.ggml.padding_token_id"),
        eot_id=_optional_int(reader, "tokenizer.ggml.eot_token_id"),
        eom_id=_optional_int(reader, "tokenizer.ggml.eom_token_id"),
        add_bos=None if add_bos is None else bool(add_bos),
        chat_template=_contents(reader, "tokenizer.chat_template"),
    )


def pre_tokenizer_json(pre: str) -> dict[str, Any]:
    """The HF pre-tokenizer for a llama.cpp `tokenizer.ggml.pre` name.

    Args:
        pre: e.g. "smollm", "llama-bpe", "gpt2", "default".

    Returns:
        A `Sequence` of isolated regex splits followed by a byte-level mapping without its own regex.

    Raises:
        ValueError: for a pre-tokenizer this converter does not know (wrong splits would corrupt ids).
    """
    regexes = PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        known = ", ".join(sorted(PRE_TOKENIZER_REGEXES))
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {known}")
    splits: list[dict[str, Any]] = [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        for regex in regexes
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"type": "Sequence", "pretokenizers": [*splits, byte_level]}


def _merge_pairs(merges: tuple[str, ...]) -> list[list[str]]:
    pairs = []
    for merge in merges:
        # Split at the first space after position 0, as llama.cpp does: a byte-level token never holds a
        # real space (it is "Ġ"), but this keeps a merge of a literal " " token well defined.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise ValueError(f"malformed merge {merge!r}: expected 'left right'")
        pairs.append([merge[:cut], merge[cut + 1 :]])
    return pairs


def _added_tokens(meta: GGUFTokenizerMeta) -> list[dict[str, Any]]:
    # Control (and unknown) tokens are special: parsed only in trusted text, skippable on decode.
    # User-defined tokens are added but not special, which is what llama.cpp does (it matches them even
    # with parse_special off) and what HF's converter writes for `special: false` added tokens.
    added = []
    for token_id, (text, kind) in enumerate(zip(meta.tokens, meta.token_types, strict=True)):
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED):
            added.append(
                {
                    "id": token_id,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind != TOKEN_TYPE_USER_DEFINED,
                }
            )
    return added


def tokenizer_json_from_meta(meta: GGUFTokenizerMeta) -> dict[str, Any]:
    """Build a HF `tokenizer.json` document from GGUF tokenizer metadata (pure).

    Args:
        meta: what `read_tokenizer_meta` returns.

    Returns:
        A dict ready for `json.dump`, loadable by `tokenizers.Tokenizer.from_str`.

    Raises:
        ValueError: not byte-level BPE, unknown pre-tokenizer, inconsistent or duplicate vocab.
    """
    if meta.model != "gpt2":
        raise ValueError(f"unsupported tokenizer.ggml.model {meta.model!r}; only 'gpt2' (byte-level BPE)")
    if len(meta.tokens) != len(meta.token_types):
        raise ValueError(f"{len(meta.tokens)} tokens but {len(meta.token_types)} token types")
    vocab = {text: token_id for token_id, text in enumerate(meta.tokens)}
    if len(vocab) != len(meta.tokens):
        raise ValueError(f"GGUF vocab has {len(meta.tokens) - len(vocab)} duplicate token strings")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(meta),
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_json(meta.pre),
        "post_processor": None,  # no BOS/EOS added: the chat template carries them
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,  # byte-level: every byte has a token, nothing is unknown
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": meta.pre in IGNORE_MERGES_PRE,
            "vocab": vocab,
            "merges": _merge_pairs(meta.merges),
        },
    }


def build_tokenizer_json(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Build a HF `tokenizer.json` document from a GGUF.

    Args:
        reader: an open GGUF whose tokenizer is byte-level BPE.

    Returns:
        The tokenizer.json document as a dict.
    """
    return tokenizer_json_from_meta(read_tokenizer_meta(reader))


def _token_name(meta: GGUFTokenizerMeta, token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < len(meta.tokens):
        return None
    return meta.tokens[token_id]


def tokenizer_config_from_meta(meta: GGUFTokenizerMeta) -> dict[str, Any]:
    """Build `tokenizer_config.json` (HF keys plus explicit ids) from GGUF tokenizer metadata (pure).

    Args:
        meta: what `read_tokenizer_meta` returns.

    Returns:
        Special token names and ids, every end-of-turn id in `eos_token_ids`, `add_bos_token` as the GGUF
        says (llama.cpp's default for the pre-tokenizer when absent) and the chat template.
    """
    add_bos = meta.add_bos if meta.add_bos is not None else meta.pre in IGNORE_MERGES_PRE
    eos_ids = sorted({i for i in (meta.eos_id, meta.eot_id, meta.eom_id) if i is not None})
    added = {str(token["id"]): {k: v for k, v in token.items() if k != "id"} for token in _added_tokens(meta)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_name(meta, meta.bos_id),
        "bos_token_id": meta.bos_id,
        "eos_token": _token_name(meta, meta.eos_id),
        "eos_token_id": meta.eos_id,
        "eos_token_ids": eos_ids,
        "pad_token": _token_name(meta, meta.pad_id),
        "pad_token_id": meta.pad_id,
        "unk_token": _token_name(meta, meta.unk_id),
        "unk_token_id": meta.unk_id,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # streamed text must equal the concatenated deltas
        "chat_template": meta.chat_template,
        "added_tokens_decoder": added,
    }


def write_tokenizer(reader: gguf.GGUFReader, out_dir: Path) -> dict[str, Any]:
    """Write `tokenizer.json` and `tokenizer_config.json` for a GGUF into `out_dir`.

    Args:
        reader: an open GGUF whose tokenizer is byte-level BPE.
        out_dir: the model folder (created if missing).

    Returns:
        A summary: pre-tokenizer, sizes, special ids, whether a chat template was found.
    """
    meta = read_tokenizer_meta(reader)
    document = tokenizer_json_from_meta(meta)
    config = tokenizer_config_from_meta(meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "tokenizer.json").open("w", encoding="utf-8") as f:
        json.dump(document, f, ensure_ascii=False)
    with (out_dir / "tokenizer_config.json").open("w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return {
        "pre": meta.pre,
        "vocab_size": len(meta.tokens),
        "merges": len(meta.merges),
        "added_tokens": len(document["added_tokens"]),
        "bos_token_id": meta.bos_id,
        "eos_token_id": meta.eos_id,
        "eos_token_ids": config["eos_token_ids"],
        "pad_token_id": meta.pad_id,
        "add_bos_token": config["add_bos_token"],
        "has_chat_template": meta.chat_template is not None,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: write the tokenizer files of a GGUF into a folder and print the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    summary = write_tokenizer(gguf.GGUFReader(args.gguf), args.out_dir)
    print(json.dumps(summary, indent=2))  # a CLI's result goes to stdout, not the log


if __name__ == "__main__":
    main()
