"""Keeps our own guard data (data/guard/*.jsonl) from near-duplicating the sets we measure on.

Our rows train the shipped head; the public harmful sets are also what the held-out-source figures are
measured on, and Alpaca / MaliciousInstruct are measure-only. A self-written row that paraphrases one of
them would make those figures optimistic. This tool embeds every own row with MiniLM and flags those whose
cosine similarity to a protected row reaches the limit; `--drop` rewrites the files without them
(contrastive pairs, rows sharing a `pair-N` or `<prefix>-pair-N` topic, are dropped whole).

    python -m tools.guard_overlap            # report
    python -m tools.guard_overlap --drop     # and remove the flagged rows
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from guard.encoder import MiniLMEncoder
from guard.features import FloatArray
from tools.guard_data import Example, add_data_arguments, load_all, read_jsonl
from tools.train_guard import featurize, first_windows

# protected source -> similarity at which an own row counts as a paraphrase of one of its rows
LIMITS = {"harmbench": 0.75, "strongreject": 0.75, "malicious_instruct": 0.75, "alpaca": 0.85}


def embed(encoder: MiniLMEncoder, texts: list[str]) -> FloatArray:
    """First-window MiniLM vectors (unit length), one per text, through train_guard's feature cache."""
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    return first_windows(featurize([Example(t, False) for t in texts], encoder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--encoder", type=Path, default=Path("models/minilm-l6-v2"))
    parser.add_argument("--drop", action="store_true", help="rewrite the files without the flagged rows")
    args = parser.parse_args(argv)
    encoder = MiniLMEncoder(args.encoder, threads=2)
    examples = load_all(args.root, args.own)
    protected = {src: embed(encoder, [e.text for e in examples if e.source == src]) for src in LIMITS}
    flagged_total = 0
    for path in sorted(args.own.glob("*.jsonl")):
        rows = read_jsonl(path)
        vecs = embed(encoder, [r["text"] for r in rows])
        flagged: set[int] = set()
        for src, limit in LIMITS.items():
            if len(protected[src]) == 0:
                continue
            sims = (vecs @ protected[src].T).max(1)
            for i in np.nonzero(sims >= limit)[0].tolist():
                flagged.add(i)
                print(f"{path.name}: {sims[i]:.2f} ~ {src}: {rows[i]['text'][:90]!r}")
        pairs = {rows[i]["topic"] for i in flagged if str(rows[i].get("topic", "")).split("-")[-2:-1] == ["pair"]}
        flagged |= {i for i, r in enumerate(rows) if r.get("topic") in pairs}
        flagged_total += len(flagged)
        if args.drop and flagged:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for i, r in enumerate(rows) if i not in flagged))
            print(f"{path.name}: dropped {len(flagged)} of {len(rows)} rows")
    print(f"{flagged_total} own rows {'dropped' if args.drop else 'flagged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
