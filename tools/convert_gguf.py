"""GGUF (Llama architecture) -> Sluice model folder: ONNX decoder + tokenizer + configs.

    python -m tools.convert_gguf MODEL.gguf --out models/NAME --precision int4|int8|fp32

The folder holds model.onnx (+ model.onnx.data), genai_config.json (onnxruntime-genai compatible),
tokenizer.json, tokenizer_config.json (with the chat template) and sluice_model.json (our metadata,
written last: its presence marks a complete folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from tools.gguf_model import GGUFModel, default_max_positions, field, sha256_of
from tools.llama_onnx import BuildOptions, build

CONVERTER_VERSION = "2"
METADATA = "sluice_model.json"
# Names of end-of-turn tokens that also end generation when the vocabulary has them (looked up by name,
# never by id): Llama 3 <|eot_id|>/<|eom_id|>, ChatML <|im_end|>.
END_OF_TURN_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>")


def _token_ids(model: GGUFModel) -> dict[str, Any]:
    r = model.reader
    tokens = [str(t) for t in field(r, "tokenizer.ggml.tokens", [])]
    index = {t: i for i, t in enumerate(tokens)}

    def name(i: Any) -> str | None:
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos = field(r, "tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos)} if eos is not None else set()
    eot = field(r, "tokenizer.ggml.eot_token_id")
    if eot is not None:
        eos_ids.add(int(eot))
    eos_ids |= {index[n] for n in END_OF_TURN_NAMES if n in index}
    bos = field(r, "tokenizer.ggml.bos_token_id")
    pad = field(r, "tokenizer.ggml.padding_token_id", eos)
    return {
        "bos_token_id": None if bos is None else int(bos),
        "bos_token": name(bos),
        "eos_token_id": None if eos is None else int(eos),
        "eos_token": name(eos),
        "eos_token_ids": sorted(eos_ids),
        "pad_token_id": None if pad is None else int(pad),
    }


def genai_config(model: GGUFModel, ids: dict[str, Any], max_positions: int) -> dict[str, Any]:
    s = model.spec
    return {
        "model": {
            "bos_token_id": ids["bos_token_id"],
            "context_length": max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": s.head_dim,
                "hidden_size": s.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": s.num_heads,
                "num_hidden_layers": s.num_layers,
                "num_key_value_heads": s.num_kv_heads,
            },
            "eos_token_id": ids["eos_token_ids"] if len(ids["eos_token_ids"]) > 1 else ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
            "type": "llama",
            "vocab_size": s.vocab_size,
        },
        "search": {"do_sample": False, "max_length": max_positions, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }


def convert(gguf_path: Path, out: Path, opts: BuildOptions, sha256: str | None = None) -> dict[str, Any]:
    """Converts into `out` atomically (a temp folder renamed at the end). Returns the metadata written."""
    t0 = time.perf_counter()
    model = GGUFModel(gguf_path)
    sha = sha256 or sha256_of(gguf_path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mp, report = build(model, opts)
    onnx.save_model(mp, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    ids = _token_ids(model)
    (tmp / "genai_config.json").write_text(json.dumps(genai_config(model, ids, opts.max_positions), indent=2))
    from tools.gguf_tokenizer import write_tokenizer

    write_tokenizer(model.reader, tmp)
    s = model.spec
    meta: dict[str, Any] = {
        "format": "sluice-model",
        "converter_version": CONVERTER_VERSION,
        "name": s.name,
        "architecture": "llama",
        "precision": opts.precision,
        "accuracy_level": opts.accuracy_level,
        "source": {"file": gguf_path.name, "sha256": sha, "file_type": s.file_type},
        "config": {
            "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
            "num_layers": s.num_layers, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim, "rope_theta": s.rope_theta, "rms_eps": s.rms_eps,
            "context_length": opts.max_positions, "trained_context_length": s.context_length,
            "tied_embeddings": s.tied_embeddings, "llama3_rope_scaling": s.has_rope_freqs,
        },
        "tokens": ids,
        "io": {"logits": "last_position", "hidden_states": [f"hidden_states.{n}" for n in opts.hidden_layers],
               "kv_dtype": "float32", "attention": "GroupQueryAttention"},
        "conversion": {"tensors": report, "seconds": round(time.perf_counter() - t0, 2)},
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.convert_gguf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path, help="a general.architecture=llama GGUF file")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--precision", choices=("int4", "int8", "fp32"), default="int4")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                    help="MatMulNBits accuracy_level (4: int8 activations, fastest; 0/1: fp32 activations)")
    ap.add_argument("--max-positions", type=int, default=None,
                    help="rotary cache / context length to export (default: the model's, capped at 32768)")
    ap.add_argument("--hidden-layers", default="",
                    help="comma-separated layer indices (and/or 'final') exposed as hidden_states.<name>")
    a = ap.parse_args(argv)
    model = GGUFModel(a.gguf)
    opts = BuildOptions(
        precision=a.precision,
        accuracy_level=a.accuracy_level,
        max_positions=default_max_positions(model.spec, a.max_positions or 32768),
        hidden_layers=tuple(x.strip() for x in a.hidden_layers.split(",") if x.strip()),
    )
    meta = convert(a.gguf, a.out, opts)
    json.dump({"out": str(a.out), "seconds": meta["conversion"]["seconds"], "tensors": meta["conversion"]["tensors"]},
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
