"""Pure report functions: medians, Sluice/peer ratios, the printed table and the JSON document.

No I/O except `write_json`; everything else takes plain data and returns plain data, so it is unit-tested
with exact numbers (tests/unit/test_bench_report.py).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BASELINE = "sluice"
PEERS = ("llama.cpp", "genai")


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool

    @property
    def heading(self) -> str:
        direction = "" if self.higher_is_better else ", lower is better"
        return f"{self.label} ({self.unit}{direction})"


def metric_specs(prompt_lengths: Sequence[int], concurrency: Sequence[int]) -> list[Metric]:
    """The table's rows for a job's prompt lengths and stream counts, in display order.

    Args:
        prompt_lengths: prompt sizes of the prefill rows.
        concurrency: stream counts of the aggregate rows.

    Returns:
        The metrics.
    """
    rows = [Metric(f"prefill_{p}_tok_s", f"prefill, {p}-token prompt", "tok/s", True) for p in prompt_lengths]
    rows += [Metric(f"ttft_{p}_ms", f"TTFT, {p}-token prompt", "ms", False) for p in prompt_lengths]
    rows.append(Metric("decode_tok_s", "decode, 1 stream", "tok/s", True))
    rows += [
        Metric(f"agg_c{n}_tok_s", f"aggregate, {n} stream{'s' if n != 1 else ''}", "tok/s", True) for n in concurrency
    ]
    rows += [
        Metric(f"agg_decode_c{n}_tok_s", f"aggregate decode only, {n} stream{'s' if n != 1 else ''}", "tok/s", True)
        for n in concurrency
    ]
    rows += [Metric(f"ttft_c{n}_ms", f"mean TTFT, {n} streams", "ms", False) for n in concurrency if n > 1]
    rows.append(Metric("sustained_tok_s", "aggregate, clients joining mid-batch", "tok/s", True))
    rows.append(Metric("sustained_ttft_ms", "TTFT, clients joining mid-batch", "ms", False))
    rows.append(Metric("rss_single_mib", "peak RSS, single-stream process", "MiB", False))
    rows.append(Metric("rss_concurrent_mib", "peak RSS, concurrent process", "MiB", False))
    return rows


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values.

    Args:
        values: samples.

    Returns:
        The median or None.
    """
    return statistics.median(values) if values else None


def ratio(ours: float | None, peer: float | None) -> float | None:
    """Sluice / peer, or None when either side is missing or the peer is zero.

    Args:
        ours: Sluice's value.
        peer: the peer's value.

    Returns:
        The ratio or None.
    """
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer


def summarize(samples: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """Median of every metric's samples.

    Args:
        samples: metric key -> samples over runs.

    Returns:
        Metric key -> median.
    """
    return {key: median(values) for key, values in samples.items()}


def merge_phases(results: Sequence[Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """Fold worker results (one per system and phase) into one record per system.

    A phase's peak RSS becomes the sample `rss_{phase}_mib`; a failed phase (a result with `error`)
    leaves its error message in the system's `errors`.

    Args:
        results: worker outputs, each with `system`, `phase` and either samples or `error`.

    Returns:
        System -> {"samples", "digests", "notes", "info", "errors"}.
    """
    merged: dict[str, dict[str, object]] = {}
    for result in results:
        system = str(result["system"])
        entry = merged.setdefault(
            system, {"samples": {}, "digests": {}, "notes": [], "info": {}, "errors": [], "greedy_ids": []}
        )
        if "error" in result:
            _as_list(entry["errors"]).append(f"{result['phase']}: {result['error']}")
            continue
        samples = _as_dict(entry["samples"])
        samples.update(_as_dict(result.get("samples", {})))
        samples[f"rss_{result['phase']}_mib"] = [_number(result["peak_rss_mib"])]
        _as_dict(entry["digests"]).update(_as_dict(result.get("digests", {})))
        if result.get("greedy_ids"):
            entry["greedy_ids"] = result["greedy_ids"]
        _as_list(entry["notes"]).extend(f"{result['phase']}: {n}" for n in _as_list(result.get("notes", [])))
        info = _as_dict(entry["info"])
        info.update(_as_dict(result.get("info", {})))
        if "load_avg_before" in result:  # the machine is shared: how busy it was when the phase began
            info[f"load_avg_before_{result['phase']}"] = result["load_avg_before"]
    return merged


def digest_mismatches(digests: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Prompts that two systems tokenized differently (each system uses its own tokenizer).

    Args:
        digests: system -> prompt key -> digest of the ids it ran.

    Returns:
        One message per prompt key whose digests differ; empty when every system ran the same ids.
    """
    by_key: dict[str, dict[str, str]] = {}
    for system, per_key in digests.items():
        for key, digest in per_key.items():
            by_key.setdefault(key, {})[system] = digest
    return [
        f"prompt {key}: " + ", ".join(f"{s}={d}" for s, d in sorted(seen.items()))
        for key, seen in sorted(by_key.items())
        if len(set(seen.values())) > 1
    ]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy continuations share.

    Args:
        a: token ids.
        b: token ids.

    Returns:
        The length of the common prefix.
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(ids: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """For each pair of systems that both ran the single-stream decode: leading tokens in common / length.

    Same weights and greedy decoding, but different kernels (llama.cpp quantizes activations to 8 bits,
    onnxruntime's int4 matmul at its accuracy level too), so a late divergence at a near-tie is expected;
    an early one points at a wrong model or prompt.

    Args:
        ids: system -> generated ids of the single-stream decode.

    Returns:
        "a vs b" -> "common/shorter length", pairs in sorted order.
    """
    names = sorted(s for s, seq in ids.items() if seq)
    return {
        f"{a} vs {b}": f"{common_prefix(ids[a], ids[b])}/{min(len(ids[a]), len(ids[b]))}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if unit == "MiB" else f"{value:.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table_rows(
    medians: Mapping[str, Mapping[str, float | None]], metrics: Sequence[Metric], peers: Sequence[str] = PEERS
) -> list[list[str]]:
    """Rows of formatted cells: metric, Sluice, each peer, then Sluice/peer for each peer.

    Rows where no system has a value are left out (e.g. the sustained rows when Sluice did not run).

    Args:
        medians: system -> metric key -> median.
        metrics: the rows to show, in order.
        peers: peer systems, in column order.

    Returns:
        The rows (without the header).
    """
    systems = [BASELINE, *peers]
    rows = []
    for metric in metrics:
        values = [medians.get(s, {}).get(metric.key) for s in systems]
        if all(v is None for v in values):
            continue
        ratios = [_fmt_ratio(ratio(values[0], peer_value)) for peer_value in values[1:]]
        rows.append([metric.heading, *(_fmt(v, metric.unit) for v in values), *ratios])
    return rows


def table_header(peers: Sequence[str] = PEERS) -> list[str]:
    """The header matching `table_rows`.

    Args:
        peers: peer systems, in column order.

    Returns:
        Column titles.
    """
    return ["metric (median)", BASELINE, *peers, *(f"{BASELINE}/{p}" for p in peers)]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into the README), numbers right-aligned.

    Args:
        header: column titles.
        rows: cells as strings, each row as long as the header.

    Returns:
        The table text, one line per row, no trailing newline.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def build_report(
    merged: Mapping[str, Mapping[str, object]],
    metrics: Sequence[Metric],
    context: Mapping[str, object],
    peers: Sequence[str] = PEERS,
) -> dict[str, object]:
    """The JSON document: context (date, machine, job), per-system medians and samples, ratios, table.

    Args:
        merged: `merge_phases` output.
        metrics: the rows.
        context: date, machine and job facts, copied in as they are.
        peers: peer systems.

    Returns:
        A JSON-serializable dict.
    """
    medians = {s: summarize(_samples(e["samples"])) for s, e in merged.items()}
    ratios = {
        p: {m.key: ratio(medians.get(BASELINE, {}).get(m.key), medians[p].get(m.key)) for m in metrics}
        for p in peers
        if p in medians
    }
    mismatches = digest_mismatches({s: _strings(e["digests"]) for s, e in merged.items()})
    agreement = greedy_agreement(
        {s: [int(_number(t)) for t in _as_list(e.get("greedy_ids", []))] for s, e in merged.items()}
    )
    return {
        **context,
        "systems": {s: {**e, "median": medians[s]} for s, e in merged.items()},
        "ratios": ratios,
        "prompt_ids_match": not mismatches,
        "prompt_mismatches": mismatches,
        "greedy_agreement": agreement,
        "table": format_table(table_header(peers), table_rows(medians, metrics, peers)),
    }


def render_summary(doc: Mapping[str, object]) -> str:
    """What `make bench` prints: a title line (date, machine, threads, runs), the table, then every
    error, note and prompt mismatch, so a missing or degraded figure is never silent.

    Args:
        doc: `build_report` output with `date`, `machine` and `job` in its context.

    Returns:
        The text.
    """
    machine, job = _as_dict(doc["machine"]), _as_dict(doc["job"])
    lines = [
        f"Sluice bench {doc['date']} | {machine['cpu']}, {machine['cores_usable']} cores usable | "
        f"threads={job['threads']} runs={job['runs']} new_tokens={job['new_tokens']}",
        "",
        str(doc["table"]),
    ]
    for system, entry in _as_dict(doc["systems"]).items():
        record = _as_dict(entry)
        lines += [f"{system} ERROR {e}" for e in _as_list(record["errors"])]
        lines += [f"{system} note: {n}" for n in _as_list(record["notes"])]
    lines += [f"MISMATCH {m}" for m in _as_list(doc["prompt_mismatches"])]
    agreement = _as_dict(doc.get("greedy_agreement", {}))
    if agreement:
        pairs = ", ".join(f"{pair} {n}" for pair, n in agreement.items())
        lines.append(f"greedy decode, leading tokens identical: {pairs}")
    loads = [
        f"{system} {key.removeprefix('load_avg_before_')} {value:.1f}"
        for system, entry in _as_dict(doc["systems"]).items()
        for key, value in _as_dict(_as_dict(entry)["info"]).items()
        if key.startswith("load_avg_before_") and isinstance(value, float)
    ]
    if loads:
        lines.append("load average before each phase: " + ", ".join(loads))
    return "\n".join(lines)


def results_path(results_dir: Path, date: str) -> Path:
    """Where a run's JSON goes: `<results_dir>/<date>.json`.

    Args:
        results_dir: bench/results.
        date: ISO date, e.g. 2025-01-31.

    Returns:
        The path.
    """
    return results_dir / f"{date}.json"


def write_json(report: Mapping[str, object], path: Path) -> None:
    """Write the report, creating the folder.

    Args:
        report: `build_report` output.
        path: target file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def _as_dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _as_list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON array, got {type(value).__name__}")
    return value


def _samples(value: object) -> dict[str, list[float]]:
    return {key: [_number(v) for v in _as_list(values)] for key, values in _as_dict(value).items()}


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _strings(value: object) -> dict[str, str]:
    return {key: str(v) for key, v in _as_dict(value).items()}
