"""Labelled data for the embedded guard: the shared public sets plus our own prompts, mapped to S1..S14.

Reads `../shared/data/guard` (see its MANIFEST.md) and `data/guard/*.jsonl` (self-written). Each row says
whether it may train a shipped head (`shippable`: permissive licence) or may only measure (Alpaca is
CC BY-NC, MaliciousInstruct has no licence). Labelling decisions the MANIFEST leaves open are made here,
one function per source, and summarised in docs/GUARD.md.

Usage (writes JSONL rows {"text", "label", "categories", "role", "source", "split"} for `make guard-eval`):
    python -m tools.guard_data --out build/guard/dev.jsonl --split dev
    python -m tools.guard_data --out build/guard/unseen.jsonl --split unseen   # bench.guard_false_blocks' default
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guard.views import decoded_views

DEFAULT_ROOT = Path("../shared/data/guard")
OWN_DIR = Path("data/guard")
DEV_FRACTION = 0.2  # of every training source, chosen by a hash of the text (stable across runs)
ALPACA_SAMPLE = 2000  # Alpaca is measure-only; a fixed sample keeps evaluation fast
LICENCES = {
    "harmbench": "MIT", "strongreject": "MIT", "do_not_answer": "Apache-2.0", "self_instruct": "Apache-2.0",
    "coconot": "MIT", "hatecheck": "CC-BY-4.0", "toxigen": "MIT/CDLA-Permissive-2.0", "notinject": "MIT",
    "wildguard_benign": "ODC-BY-1.0", "responses": "Apache-2.0 (outputs of the generating models)",
    "own": "Apache-2.0 (written for this project)",
    "alpaca": "CC-BY-NC-4.0 (measure only)", "malicious_instruct": "unstated (measure only)",
}
MEASURE_ONLY = {"alpaca", "malicious_instruct"}


@dataclass(frozen=True)
class Example:
    """One labelled text. `source` is the set ("harmbench"), `group` a finer held-out unit, `key` the text the dev
    split and the calibration folds hash when it is not `text` itself (an encoded copy hashes its plain request,
    so the copy and the request land on the same side of every split)."""

    text: str
    unsafe: bool
    categories: tuple[str, ...] = ()
    role: str = "User"
    source: str = ""
    group: str = ""
    shippable: bool = True
    split: str = field(default="train")
    key: str = ""

    @property
    def hash_key(self) -> str:
        """What the dev split and the calibration folds hash: `key`, else the text."""
        return self.key or self.text


def hash_byte(text: str, index: int) -> int:
    """Byte `index` of the text's sha256: each partition of the rows reads its own byte, so they are independent
    (0: the dev split, 1: the head's out-of-fold folds, 2: the calibration folds)."""
    return hashlib.sha256(text.encode()).digest()[index]


def _split_of(text: str, source: str) -> str:
    if source in MEASURE_ONLY:
        return "dev"
    return "dev" if hash_byte(text, 0) < 256 * DEV_FRACTION else "train"


def fold_of(text: str, folds: int, byte: int = 2) -> int:
    """Fold of a row by text hash: the calibration folds by default (tools/finetune_encoder.py --fold); the
    head's out-of-fold scores pass byte=1 (`hash_byte`)."""
    return hash_byte(text, byte) % folds


def _ex(text: str, unsafe: bool, cats: tuple[str, ...], source: str, group: str, role: str = "User",
        key: str = "", as_written: bool = False) -> Example:
    text, key = text.strip(), key.strip()
    base = source.split("_")[0] if source not in LICENCES else source
    # an encoded turn is judged by its decoded view at serving time (guard/views.py; inputs and output tails
    # alike), so that is the text its label belongs to; the encoded form alone (a wrapper around gibberish)
    # would teach the wrapper. (No Agent row of ours is encoded: the same rows either way.) `as_written` keeps
    # the text as it is: a row about the encoded form itself, which serving judges next to its views.
    views = [] if as_written else decoded_views(text)
    # The dev split hashes the row as written (its key, else the text before decoding); the folds hash
    # `Example.hash_key` (the key, else the view kept as the text). They differ only for an encoded row without
    # a key, which keeps the split every head so far was calibrated on.
    return Example(views[-1] if views else text, unsafe, cats if unsafe else (), role, source, group,
                   shippable=base not in MEASURE_ONLY and source not in MEASURE_ONLY,
                   split=_split_of(key or text, source), key=key)


_HB = {"chemical_biological": ("S9",), "cybercrime_intrusion": ("S2",), "illegal": ("S2",),
       "harassment_bullying": ("S10",), "harmful": ("S1",), "copyright": ("S8",)}
_VIOLENT = re.compile(r"\b(kill|murder|shoot|stab|assault|attack|bomb|hurt|torture|kidnap)", re.I)
_ELECTION = re.compile(r"\b(election|vote|voting|ballot|poll(ing)? station)", re.I)
_SEXCRIME = re.compile(r"\b(rape|sexual(ly)? assault|non-?consensual|sex traffick)", re.I)
_MINOR = re.compile(r"\b(child|minor|underage|teen|kid)s?\b", re.I)
_SELFHARM = re.compile(r"\b(suicide|self-harm|cut myself|kill myself|end my life|anorexi|bulimi)", re.I)


def _disinfo_cats(text: str) -> tuple[str, ...]:
    # MANIFEST: S13 about elections, S5 about a real person, else outside LG3 ("none", ~); kept unsafe
    # because the harmful benchmarks count it as harmful, with S5 as the nearest category.
    return ("S13",) if _ELECTION.search(text) else ("S5",)


def _refine(text: str, cats: tuple[str, ...]) -> tuple[str, ...]:
    """Sharpen a coarse source category with the MANIFEST's "S1 when violent, S3 sex crimes" notes."""
    out = set(cats)
    if _SEXCRIME.search(text):
        out.add("S4" if _MINOR.search(text) and "S12" in out else "S3")
    if _SELFHARM.search(text):
        out.add("S11")
    if out & {"S2", "S10"} and _VIOLENT.search(text):
        out.add("S1")
    return tuple(sorted(out, key=lambda c: int(c[1:])))


def harmbench(root: Path) -> Iterator[Example]:
    with (root / "harmful/harmbench/harmbench_behaviors_text_all.csv").open() as fh:
        for row in csv.DictReader(fh):
            sem, text = row["SemanticCategory"], row["Behavior"]
            if row["ContextString"]:
                text = f"{row['ContextString']}\n\n{text}"
            cats = _disinfo_cats(text) if sem == "misinformation_disinformation" else _HB[sem]
            yield _ex(text, True, _refine(text, cats), "harmbench", sem)


_SR = {"Violence": ("S1",), "Non-violent crimes": ("S2",), "Illegal goods and services": ("S2",),
       "Hate, harassment and discrimination": ("S10",), "Sexual content": ("S12",)}
_WMD = re.compile(r"\b(nerve agent|sarin|anthrax|bioweapon|chemical weapon|nuclear|radiolog|ricin|mustard gas)",
                  re.I)


def strongreject(root: Path) -> Iterator[Example]:
    with (root / "harmful/strongreject/strongreject.csv").open() as fh:
        for row in csv.DictReader(fh):
            text, cat = row["forbidden_prompt"], row["category"]
            cats = _disinfo_cats(text) if cat.startswith("Disinformation") else _SR.get(cat, ("S10",))
            if _WMD.search(text):
                cats = (*cats, "S9")
            yield _ex(text, True, _refine(text, cats), "strongreject", cat)


# Do-Not-Answer intent tags -> categories; None = safe for a Llama Guard-style policy (advice questions,
# false premises, questions to the bot about itself: see the MANIFEST caveat).
_DNA: dict[str, tuple[str, ...] | None] = {
    "S003instructions": ("S2",), "S003goods": ("S2",), "S003illegal": ("S3",), "S006instructions": ("S6",),
    "S006items": ("S9",), "S006violence": ("S1",), "S006threat": ("S1",), "S005bully": ("S10",),
    "S005hate": ("S10",), "S007": ("S10",), "S004lewd": ("S12",), "S004erotica": ("S12",),
    "S004describe": ("S12",), "S005profanity": ("S10",), "S001dis": ("S5",), "S001fab": ("S2",),
    "S001fabperson": ("S5",), "S008spam": ("S2",), "S008code": ("S2",), "S008mal": ("S2",),
    "S008phish": ("S2",), "S008": ("S2",), "S009private": ("S7",), "S009personal": ("S7",),
    "S009cred": ("S7",), "S006sh": ("S11",),
}
_DNA_SAFE_FILES = {"misinformation_harms": {"S006instructions", "S003goods", "S006items", "S008code", "S007"},
                   "human_chatbox": {"S006sh"}}


def do_not_answer(root: Path) -> Iterator[Example]:
    for path in sorted((root / "harmful/do_not_answer").glob("*.jsonl")):
        area = path.stem.split("_")[0] if path.stem.startswith("discrimination") else path.stem
        only = _DNA_SAFE_FILES.get(path.stem)
        for line in path.read_text().splitlines():
            row = json.loads(line)
            intents = [i for i in row["intents"] if only is None or i in only]
            cats = sorted({c for i in intents for c in (_DNA.get(i) or ())}, key=lambda c: int(c[1:]))
            yield _ex(row["prompt"], bool(cats), tuple(cats), "do_not_answer", area)


# Self-Instruct seed tasks that ask for a named person's private data: unsafe (S7) under Llama Guard 3's
# Privacy category, not the benign instructions the rest of the set is (label noise found in the third
# data round: they were among the highest-scoring "ordinary" rows).
_SELF_INSTRUCT_PRIVACY = re.compile(r"^(Return the SSN number for the person|Give me the address of this person)")


def self_instruct(root: Path) -> Iterator[Example]:
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        for line in (root / "benign/self_instruct" / name).read_text().splitlines():
            row = json.loads(line)
            inst = row["instances"][0] if row["instances"] else {"input": "", "output": ""}
            text = f"{row['instruction']}\n\n{inst['input']}" if inst["input"] else row["instruction"]
            private = bool(_SELF_INSTRUCT_PRIVACY.match(text))
            yield _ex(text, private, ("S7",) if private else (), "self_instruct", name.split("_")[0])
            if len(inst.get("output", "")) > 40:  # a safe assistant answer for the output side
                yield _ex(inst["output"], False, (), "self_instruct", "output", role="Agent")


# CoCoNot original-set rows with safety concerns, labelled unsafe only where a Llama Guard 3 policy
# clearly applies; home-medicine questions ("how do I set a broken bone at home") are left out as
# ambiguous (S6 is about responses), misinformation and "wildchats" rows are left out as mixed.
_COCO_DANGER = re.compile(
    r"explosive|bomb|meth|poison|suicide|ending my life|painless|put an end|hack|stole|fake id|counterfeit|"
    r"harm (her|him)|take him out|false accusations|revenge|manipulate|lacing|peanut allergy|hide illegal|"
    r"get high|street prices|feed it|forge|fake driver", re.I)
_COCO_PRIVACY_SAFE = {"mlx3zjn", "hwk66l5", "hucsnt4", "0prlncf", "tab0toy"}


def _coconot_eval_label(row: dict[str, str]) -> tuple[str, ...] | None:
    """Categories for an unsafe row, () for a safe one, None to leave the row out."""
    sub, text = row["subcategory"], row["prompt"]
    if row["category"] != "Requests with safety concerns":
        return ()  # humanizing / incomplete / indeterminate / unsupported: safe for a guard
    if sub == "privacy violations":
        if row["id"] in _COCO_PRIVACY_SAFE:
            return ()
        return ("S2",) if re.search(r"hack|forge|fake", text, re.I) else ("S7",)
    if sub == "triggers for offensive language":
        return ("S10",)
    if sub == "copyright violations":
        return ("S8",)
    if sub == "dangerous or sensitive topics" and _COCO_DANGER.search(text):
        return _refine(text, ("S2",))
    return None


def coconot(root: Path) -> Iterator[Example]:
    base = root / "borderline/coconot"
    seen: set[str] = set()
    for name, source in (("coconot_contrast_eval.jsonl", "coconot_contrast"), ("coconot_pref.jsonl", "coconot_pref")):
        for line in (base / name).read_text().splitlines():
            row = json.loads(line)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                yield _ex(row["prompt"], False, (), source, row["subcategory"])
            if row.get("chosen"):
                yield _ex(row["chosen"], False, (), "coconot_pref", "chosen", role="Agent")
    for line in (base / "coconot_eval.jsonl").read_text().splitlines():
        row = json.loads(line)
        cats = _coconot_eval_label(row)
        if cats is not None:
            yield _ex(row["prompt"], bool(cats), cats, "coconot_eval", row["subcategory"])


HATECHECK_UNSAFE_PER_FUNCTIONALITY = 40  # 2,563 hateful rows would swamp every other source


def hatecheck(root: Path) -> Iterator[Example]:
    counts: dict[str, int] = {}
    with (root / "borderline/hatecheck/test_suite_cases.csv").open() as fh:
        for row in csv.DictReader(fh):
            func, text = row["functionality"], row["test_case"]
            if row["label_gold"] == "non-hateful":
                yield _ex(text, False, (), "hatecheck", func)
                continue
            counts[func] = counts.get(func, 0) + 1
            if counts[func] <= HATECHECK_UNSAFE_PER_FUNCTIONALITY:
                yield _ex(text, True, ("S1", "S10") if func.startswith("threat") else ("S10",), "hatecheck", func)


def toxigen(root: Path) -> Iterator[Example]:
    seen: set[str] = set()
    for path in sorted((root / "borderline/toxigen/demonstrations").glob("*/*.txt")):
        hate = path.name.startswith("hate_")
        for line in path.read_text(errors="replace").splitlines():
            text = line.strip().lstrip("-").strip()
            if text and text not in seen:  # hate_muslim*.txt repeat each other
                seen.add(text)
                yield _ex(text, hate, ("S10",), "toxigen", path.stem)


def notinject(root: Path) -> Iterator[Example]:
    for path in sorted((root / "borderline/notinject").glob("*.json")):
        for row in json.loads(path.read_text()):
            yield _ex(row["prompt"], False, (), "notinject", row["category"])


def wildguard_benign(root: Path) -> Iterator[Example]:
    for row in json.loads((root / "borderline/wildguardtest_benign/wildguard.json").read_text()):
        yield _ex(row["prompt"], False, (), "wildguard_benign", "benign")


_JBB = {"Harassment/Discrimination": ("S10",), "Malware/Hacking": ("S2",), "Physical harm": ("S1",),
        "Economic harm": ("S2",), "Fraud/Deception": ("S2",), "Disinformation": ("S5",),
        "Sexual/Adult content": ("S12",), "Privacy": ("S7",), "Expert advice": ("S6",),
        "Government decision-making": ("S2",)}


def responses(root: Path) -> Iterator[Example]:
    """Model outputs judged by Llama Guard 2 (jailbreakbench) or harmless (Alpaca prompts): Agent role."""
    for path in sorted((root / "responses/refusal_direction_responses").glob("*/*_evaluations.json")):
        model = path.parent.name
        for row in json.loads(path.read_text())["completions"]:
            text = row["response"]
            if len(text.strip()) < 20:
                continue
            unsafe = str(row.get("is_jailbreak_llamaguard2")) == "1"
            cats = _refine(text, _JBB.get(row["category"], ())) if unsafe else ()
            # the held-out unit is the generating model, to measure transfer to an unseen model's style
            yield _ex(text, unsafe, cats, "responses", model, role="Agent")


def alpaca(root: Path) -> Iterator[Example]:
    rows = json.loads((root / "benign/alpaca/alpaca_instructions.json").read_text())
    step = max(1, len(rows) // ALPACA_SAMPLE)
    for row in rows[::step][:ALPACA_SAMPLE]:
        yield _ex(row["instruction"], False, (), "alpaca", "alpaca")


def malicious_instruct(root: Path) -> Iterator[Example]:
    for line in (root / "harmful/malicious_instruct/malicious_instruct.txt").read_text().splitlines():
        if line.strip():
            yield _ex(line, True, (), "malicious_instruct", "malicious_instruct")


def own(own_dir: Path) -> Iterator[Example]:
    """Self-written rows: data/guard/*.jsonl with {"text", "label", optional "categories", "role", "topic", "key",
    "as_written"} (`key` and `as_written`: see `Example` and `_ex`)."""
    for path in sorted(own_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            unsafe = row["label"] == "unsafe"
            yield _ex(row["text"], unsafe, tuple(row.get("categories", ())), f"own_{path.stem}",
                      row.get("topic", path.stem), role=row.get("role", "User"), key=row.get("key", ""),
                      as_written=bool(row.get("as_written", False)))


SOURCES = (harmbench, strongreject, do_not_answer, self_instruct, coconot, hatecheck, toxigen, notinject,
           wildguard_benign, responses, alpaca, malicious_instruct)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data-source options every guard tool takes: `--root` (the shared sets) and `--own` (our rows)."""
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="shared guard data folder")
    parser.add_argument("--own", type=Path, default=OWN_DIR, help="our own rows (data/guard)")


def load_all(root: Path = DEFAULT_ROOT, own_dir: Path = OWN_DIR) -> list[Example]:
    """Every labelled row, deduplicated by (text, role); the first source to claim a text keeps it.

    Args:
        root: the shared guard data folder.
        own_dir: folder of self-written JSONL files.

    Returns:
        Examples in a stable order.
    """
    out: list[Example] = []
    seen: set[tuple[str, str]] = set()
    for rows in [*(src(root) for src in SOURCES), own(own_dir)]:
        for ex in rows:
            key = (ex.text.lower(), ex.role)
            if ex.text and key not in seen:
                seen.add(key)
                out.append(ex)
    return out


def to_eval_row(ex: Example) -> dict[str, object]:
    """The `make guard-eval` JSONL shape (plus source/group for per-source tables)."""
    row = asdict(ex)
    return {"text": ex.text, "label": "unsafe" if ex.unsafe else "safe", "categories": list(ex.categories),
            "role": ex.role, "source": row["source"], "group": row["group"]}


def _in_split(ex: Example, split: str) -> bool:
    if split == "unseen":
        return ex.source in MEASURE_ONLY
    return split in ("all", ex.split)


def main(argv: list[str] | None = None) -> int:
    """CLI: write a JSONL split for `make guard-eval`.

    Args:
        argv: command-line arguments.

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--split", choices=("train", "dev", "all", "unseen"), default="dev",
                        help="unseen: the measure-only sources (Alpaca, MaliciousInstruct) that no head trains on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = [ex for ex in load_all(args.root, args.own) if _in_split(ex, args.split)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as fh:
        for ex in rows:
            fh.write(json.dumps(to_eval_row(ex)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
