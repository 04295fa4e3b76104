"""Exact numbers for the benchmark's pure parts: report (medians, ratios, table, JSON) and trace maths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report
from bench.harness import Job, StreamTrace, aggregate_rate, decode_aggregate_rate
from bench.prompts import ids_digest, prompt_ids, prompt_text


def test_median_odd_even_and_empty() -> None:
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    assert report.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert report.median([]) is None


def test_ratio_is_ours_over_peer_and_none_when_undefined() -> None:
    assert report.ratio(150.0, 100.0) == 1.5
    assert report.ratio(None, 100.0) is None
    assert report.ratio(150.0, None) is None
    assert report.ratio(150.0, 0.0) is None


def test_metric_specs_follow_job_sizes_and_mark_lower_is_better() -> None:
    specs = report.metric_specs((128, 512), (1, 4))
    keys = [m.key for m in specs]
    assert keys[:5] == [
        "prefill_128_tok_s",
        "prefill_512_tok_s",
        "ttft_128_ms",
        "ttft_512_ms",
        "decode_tok_s",
    ]
    assert "agg_c4_tok_s" in keys and "agg_c8_tok_s" not in keys
    by_key = {m.key: m for m in specs}
    assert by_key["ttft_128_ms"].heading == "TTFT, 128-token prompt (ms, lower is better)"
    assert by_key["decode_tok_s"].heading == "decode, 1 stream (tok/s)"


def _result(system: str, phase: str, samples: dict[str, list[float]], rss: float) -> dict[str, object]:
    return {
        "system": system,
        "phase": phase,
        "samples": samples,
        "digests": {"s0_128": "abc"},
        "notes": [],
        "info": {"threads": 2},
        "peak_rss_mib": rss,
    }


def test_merge_phases_folds_rss_per_phase_and_keeps_errors() -> None:
    merged = report.merge_phases(
        [
            _result("genai", "single", {"decode_tok_s": [140.0, 150.0]}, 369.0),
            _result("genai", "concurrent", {"agg_c4_tok_s": [297.0]}, 512.0),
            {"system": "sluice", "phase": "single", "error": "engine missing"},
        ]
    )
    assert merged["genai"]["samples"] == {
        "decode_tok_s": [140.0, 150.0],
        "rss_single_mib": [369.0],
        "agg_c4_tok_s": [297.0],
        "rss_concurrent_mib": [512.0],
    }
    assert merged["sluice"]["errors"] == ["single: engine missing"]


def test_digest_mismatches_names_the_prompt_and_systems() -> None:
    same = {"a": {"s0_128": "x", "s0_512": "y"}, "b": {"s0_128": "x"}}
    assert report.digest_mismatches(same) == []
    differ = {"a": {"s0_128": "x"}, "b": {"s0_128": "z"}}
    assert report.digest_mismatches(differ) == ["prompt s0_128: a=x, b=z"]


def test_table_rows_format_values_and_ratios_and_skip_empty_rows() -> None:
    medians = {
        "sluice": {"decode_tok_s": 150.0, "rss_single_mib": 400.4},
        "llama.cpp": {"decode_tok_s": 100.0, "rss_single_mib": 258.0},
        "genai": {"decode_tok_s": 142.0},
    }
    metrics = report.metric_specs((128,), (1,))
    rows = report.table_rows(medians, metrics)
    assert rows == [
        ["decode, 1 stream (tok/s)", "150.0", "100.0", "142.0", "1.50x", "1.06x"],
        ["peak RSS, single-stream process (MiB, lower is better)", "400", "258", "n/a", "1.55x", "n/a"],
    ]


def test_format_table_is_aligned_markdown() -> None:
    text = report.format_table(["m", "a"], [["decode", "1.5"], ["x", "10.25"]])
    assert text.splitlines() == [
        "| m      |     a |",
        "|--------|------:|",
        "| decode |   1.5 |",
        "| x      | 10.25 |",
    ]


def test_build_report_and_write_json_roundtrip(tmp_path: Path) -> None:
    merged = report.merge_phases(
        [
            _result("sluice", "single", {"decode_tok_s": [120.0, 130.0, 125.0]}, 300.0),
            _result("genai", "single", {"decode_tok_s": [100.0]}, 400.0),
        ]
    )
    context = {"date": "2025-01-31T10:00:00+00:00", "machine": {"cpu": "x", "cores_usable": 2}, "job": {}}
    doc = report.build_report(merged, report.metric_specs((128,), (1,)), context)
    genai_ratios = doc["ratios"]["genai"]  # type: ignore[index]
    assert genai_ratios["decode_tok_s"] == 1.25  # median 125 / 100
    assert genai_ratios["rss_single_mib"] == 0.75  # 300 / 400 MiB
    assert genai_ratios["prefill_128_tok_s"] is None  # neither side measured it
    assert doc["prompt_ids_match"] is True
    path = report.results_path(tmp_path / "results", "2025-01-31")
    report.write_json(doc, path)
    assert path.name == "2025-01-31.json"
    assert json.loads(path.read_text())["systems"]["sluice"]["median"]["decode_tok_s"] == 125.0


def test_render_summary_surfaces_errors_and_mismatches() -> None:
    merged = report.merge_phases(
        [
            {"system": "sluice", "phase": "single", "error": "no engine"},
            _result("genai", "single", {"decode_tok_s": [100.0]}, 400.0),
        ]
    )
    merged["genai"]["digests"] = {"s0_128": "zzz"}
    merged["llama.cpp"] = {**merged["genai"], "digests": {"s0_128": "yyy"}}
    context = {"date": "2025-01-31T10:00", "machine": {"cpu": "Xeon", "cores_usable": 2},
               "job": {"threads": 2, "runs": 5, "new_tokens": 128}}  # fmt: skip
    text = report.render_summary(report.build_report(merged, report.metric_specs((128,), (1,)), context))
    assert text.startswith("Sluice bench 2025-01-31T10:00 | Xeon, 2 cores usable | threads=2 runs=5")
    assert "sluice ERROR single: no engine" in text
    assert "MISMATCH prompt s0_128: genai=zzz, llama.cpp=yyy" in text


def test_stream_trace_ttft_and_decode_rate() -> None:
    trace = StreamTrace(start=10.0, token_times=[10.5, 10.6, 10.7, 10.9])
    assert trace.ttft == pytest.approx(0.5)
    assert trace.decode_rate() == pytest.approx(3 / 0.4)
    assert StreamTrace(start=0.0, token_times=[1.0]).decode_rate() == 0.0


def test_aggregate_rate_spans_first_submit_to_last_token() -> None:
    traces = [
        StreamTrace(start=0.0, token_times=[0.5, 1.0]),
        StreamTrace(start=0.5, token_times=[1.0, 1.5, 2.0]),
        StreamTrace(start=0.2, token_times=[]),
    ]
    assert aggregate_rate(traces) == pytest.approx(5 / 2.0)
    assert aggregate_rate([StreamTrace(start=0.0)]) == 0.0


def test_job_from_json_restores_tuples() -> None:
    job = Job.from_json({"model_dir": "m", "gguf": "g", "concurrency": [1, 8], "prompt_lengths": [64]})
    assert job.concurrency == (1, 8) and job.prompt_lengths == (64,) and job.runs == 5


def test_prompts_differ_per_stream_and_cut_exactly() -> None:
    assert prompt_text(0) != prompt_text(10)  # same paragraph rotation, different heading
    assert prompt_text(0).startswith("Chapter 1.\n\nThe lighthouse keeper")

    def words(text: str) -> list[int]:
        return [len(w) for w in text.split()]  # a stand-in tokenizer: one id per word

    ids = prompt_ids(words, 3, 512)
    assert len(ids) == 512 and ids == words(prompt_text(3))[:512]
    with pytest.raises(ValueError, match="fewer than the 100000 needed"):
        prompt_ids(words, 0, 100_000)
    assert ids_digest([1, 2, 3]) == ids_digest([1, 2, 3]) != ids_digest([1, 2, 4])
    assert len(ids_digest([1])) == 16


def test_common_prefix_and_greedy_agreement_pairs() -> None:
    assert report.common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert report.common_prefix([1, 2], [1, 2, 3]) == 2
    agreement = report.greedy_agreement({"sluice": [1, 2, 3], "genai": [1, 2, 3], "llama.cpp": [1, 5], "x": []})
    assert agreement == {"genai vs llama.cpp": "1/2", "genai vs sluice": "3/3", "llama.cpp vs sluice": "1/2"}


def test_merge_keeps_greedy_ids_and_report_compares_them() -> None:
    single = _result("sluice", "single", {"decode_tok_s": [1.0]}, 1.0) | {"greedy_ids": [5, 6, 7]}
    peer = _result("genai", "single", {"decode_tok_s": [1.0]}, 1.0) | {"greedy_ids": [5, 6, 8]}
    concurrent = _result("sluice", "concurrent", {}, 2.0) | {"greedy_ids": []}
    merged = report.merge_phases([single, peer, concurrent])
    assert merged["sluice"]["greedy_ids"] == [5, 6, 7]  # the concurrent phase's empty list does not erase it
    context = {
        "date": "d",
        "machine": {"cpu": "c", "cores_usable": 2},
        "job": {"threads": 2, "runs": 1, "new_tokens": 3},
    }
    doc = report.build_report(merged, report.metric_specs((128,), (1,)), context)
    assert doc["greedy_agreement"] == {"genai vs sluice": "2/3"}
    assert "greedy decode, leading tokens identical: genai vs sluice 2/3" in report.render_summary(doc)


def test_decode_aggregate_rate_excludes_prefill() -> None:
    traces = [
        StreamTrace(start=0.0, token_times=[1.0, 1.5, 2.0]),  # 2 decode tokens
        StreamTrace(start=0.0, token_times=[1.2, 3.0]),  # 1 decode token
        StreamTrace(start=0.0, token_times=[0.5]),  # no decode token: left out
    ]
    assert decode_aggregate_rate(traces) == pytest.approx(3 / 2.0)  # first token 1.0 -> last 3.0
    assert decode_aggregate_rate([StreamTrace(start=0.0, token_times=[1.0])]) == 0.0


def test_guard_overhead_tpot_counts_the_same_token_span_in_both_configurations() -> None:
    from bench.guard_overhead import _Stream

    # unguarded: one token per chunk, 10 ms apart; guarded: the first release holds 4 tokens, then windows
    plain = _Stream(times=[0.10 + 0.01 * i for i in range(12)], tokens=list(range(1, 13)))
    guarded = _Stream(times=[0.20, 0.30, 0.36], tokens=[4, 8, 12])
    assert plain.tpot(after=4) == pytest.approx((0.21 - 0.13) / 8)  # from the 4th token, not the 1st
    assert guarded.tpot(after=4) == pytest.approx((0.36 - 0.20) / 8)
    assert guarded.itl() == pytest.approx([0.10 / 4, 0.06 / 4])  # one value per chunk, per token
    assert _Stream(times=[0.2], tokens=[3]).tpot(after=4) is None  # never reached the span
    assert _Stream(times=[0.2], tokens=[4]).tpot(after=4) is None  # nothing after it
    # time to the first window's tokens: the unguarded stream's 4th token, the guarded stream's first release
    assert plain.time_to(4) == pytest.approx(0.13) and guarded.time_to(4) == pytest.approx(0.20)
    assert _Stream(times=[0.2], tokens=[3]).time_to(4) is None


def test_false_blocks_groups_given_answers_by_label_and_kind(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bench.guard_false_blocks import given_answers, stopped_fractions

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "ok": 1, "bad": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rows = [{"text": "ok ok", "label": "safe", "kind": "everyday", "prompt": "p1"},
            {"text": "bad", "label": "unsafe", "prompt": "p2"},
            {"text": "ok bad", "label": "safe", "kind": "refusal"}]
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts, ids, groups = given_answers(path, tok)
    assert prompts == ["p1", "p2", ""]
    assert ids == [[1, 1], [2], [1, 2]]
    assert groups == [["safe", "safe / everyday"], ["unsafe"], ["safe", "safe / refusal"]]
    out = stopped_fractions({"cfg": [0.55, 0.95, 0.2]}, groups)["cfg"]
    assert list(out) == ["safe", "unsafe", "safe / everyday", "safe / refusal"]
    assert out["safe"]["0.5"] == 0.5 and out["safe"]["0.6"] == 0.0
    assert out["unsafe"]["0.9"] == 1.0
    assert out["safe / everyday"]["0.5"] == 1.0 and out["safe / refusal"]["0.5"] == 0.0


def test_false_blocks_schedules_parse_as_served_names() -> None:
    from bench.guard_false_blocks import SCHEDULES, parse_schedules

    assert parse_schedules("4:16,16:16") == SCHEDULES
    assert parse_schedules("4:32") == {"first 4, doubling to 32": (4, 32)}
    assert parse_schedules("64:32") == {"flat 32": (32, 32)}  # the first window is capped at the window
