"""metrics.PrometheusSink over a fresh registry: exact series from records, verdicts and call ends; the
engine collector at scrape time; the dashboard and alert rules against the metric names that exist
(`promtool check rules` and `promtool test rules`, from the Debian package prometheus: `make tools-deb`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, enable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guard.moderator import Stage, Verdict
from service.config import Config, MetricsConfig
from service.engine.engine import EngineStats
from service.grpc_metrics import CallEnd, CallInfo
from service.metrics import FINISH_REASONS, PrometheusSink, category_labels, start_metrics
from service.stats import NullSink, RequestRecord

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/sluice-dashboard.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"
GENERATE = CallInfo.parse("/sluice.v1.GenerationService/Generate", False, True)
COMPLETE = CallInfo.parse("/sluice.v1.GenerationService/Complete", False, False)
TOKENIZE = CallInfo.parse("/sluice.v1.GenerationService/Tokenize", False, False)
# PromQL words that look like metric names but are functions, keywords or label names.
PROMQL_WORDS = frozenset({"sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "on",
                          "ignoring", "group_left", "group_right", "and", "or", "unless", "max", "min", "avg",
                          "count", "clamp_min", "clamp_max", "topk", "bool", "offset", "le", "vector", "label_values",
                          "abs", "time", "delta", "deriv", "absent", "avg_over_time", "max_over_time",
                          "min_over_time"})


def sample_values(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value, via the exposition parser."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class FakeSpec:
    name: str = "tiny"
    precision: str = "int4"


@dataclass
class FakeEngine:
    spec: FakeSpec
    current: EngineStats

    def stats(self) -> EngineStats:
        return self.current


def test_records_feed_histograms_with_exact_counts_and_sums() -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    sink.record_request(RequestRecord("Generate", "eos", prompt_tokens=7, completion_tokens=3, queue_seconds=0.002,
                                      ttft_seconds=0.25, e2e_seconds=0.5, inter_token_seconds=(0.02, 0.03)))
    # blocked at the input: no text released, never queued
    sink.record_request(RequestRecord("Complete", "content_filter", prompt_tokens=4, e2e_seconds=0.01))
    s = sample_values(sink.registry)
    assert value(s, "sluice_time_to_first_token_seconds_count") == 1
    assert value(s, "sluice_time_to_first_token_seconds_sum") == 0.25
    assert value(s, "sluice_time_to_first_token_seconds_bucket", le="0.3") == 1
    assert value(s, "sluice_time_to_first_token_seconds_bucket", le="0.2") == 0
    assert value(s, "sluice_inter_token_latency_seconds_count") == 2
    assert value(s, "sluice_e2e_request_latency_seconds_count") == 2
    assert value(s, "sluice_request_queue_time_seconds_count") == 1
    assert value(s, "sluice_request_prompt_tokens_sum") == 11
    assert value(s, "sluice_request_generation_tokens_sum") == 3
    # finish reasons are counted once per call, at its end: records alone move no request counter
    assert sum(value(s, "sluice_requests_total", rpc=r, finish_reason=f)
               for r in ("Generate", "Complete") for f in FINISH_REASONS) == 0


@pytest.mark.parametrize(("code", "reason"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "rejected"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected"),
    (grpc.StatusCode.UNAUTHENTICATED, "rejected"),
    (grpc.StatusCode.FAILED_PRECONDITION, "rejected"),
    (grpc.StatusCode.UNAVAILABLE, "rejected"),
    (grpc.StatusCode.CANCELLED, "cancelled"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    (grpc.StatusCode.INTERNAL, "error"),
    (grpc.StatusCode.UNKNOWN, "error"),
])
def test_calls_without_a_record_count_by_status(code: grpc.StatusCode, reason: str) -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    sink.call_started(GENERATE)
    sink.call_finished(CallEnd(GENERATE, code, 0.01))
    s = sample_values(sink.registry)
    counted = {f: value(s, "sluice_requests_total", rpc="Generate", finish_reason=f) for f in FINISH_REASONS}
    assert counted == {f: (1.0 if f == reason else 0.0) for f in FINISH_REASONS}


def test_a_record_decides_the_finish_reason_and_is_counted_once() -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    record = RequestRecord("Generate", "deadline", prompt_tokens=3, e2e_seconds=1.0)
    sink.record_request(record)
    # the servicer turns a DEADLINE finish into DEADLINE_EXCEEDED; the record's reason stands, counted once
    sink.call_finished(CallEnd(GENERATE, grpc.StatusCode.DEADLINE_EXCEEDED, 1.0, record=record))
    sink.call_finished(CallEnd(COMPLETE, grpc.StatusCode.OK, 0.2, record=replace(record, rpc="Complete",
                                                                                   finish_reason="length")))
    s = sample_values(sink.registry)
    assert value(s, "sluice_requests_total", rpc="Generate", finish_reason="deadline") == 1
    assert value(s, "sluice_requests_total", rpc="Complete", finish_reason="length") == 1
    assert sum(value(s, "sluice_requests_total", rpc=r, finish_reason=f)
               for r in ("Generate", "Complete") for f in FINISH_REASONS) == 2


def test_grpc_series_use_the_ecosystem_names_and_codes() -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    for code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED):
        sink.call_started(TOKENIZE)
        sink.call_finished(CallEnd(TOKENIZE, code, 0.5))
    s = sample_values(sink.registry)
    base = {"grpc_type": "unary", "grpc_service": "sluice.v1.GenerationService", "grpc_method": "Tokenize"}
    assert value(s, "grpc_server_started_total", **base) == 3
    for code_name in ("OK", "InvalidArgument", "Canceled"):
        assert value(s, "grpc_server_handled_total", grpc_code=code_name, **base) == 1
    assert value(s, "grpc_server_handling_seconds_count", **base) == 3
    assert value(s, "grpc_server_handling_seconds_sum", **base) == 1.5
    # Tokenize has no finish reason: not a generation request
    assert all(value(s, "sluice_requests_total", rpc="Generate", finish_reason=f) == 0 for f in FINISH_REASONS)


def test_guard_decisions_have_bounded_category_labels() -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    sink.record_verdict(Verdict(True, stage=Stage.INPUT, latency=0.001))
    sink.record_verdict(Verdict(False, ("S1", "S9"), 0.9, stage=Stage.OUTPUT, latency=0.002))
    sink.record_verdict(Verdict(False, ("X-custom",), 0.9, stage=Stage.MODERATE, latency=0.003))
    sink.record_verdict(Verdict(False, (), 1.0, stage=Stage.INPUT, latency=2.0, error=True))
    s = sample_values(sink.registry)
    decisions = {k[1]: v for k, v in s.items() if k[0] == "sluice_guard_decisions_total"}
    assert decisions == {
        (("category", "none"), ("stage", "input"), ("verdict", "safe")): 1,
        (("category", "S1"), ("stage", "output"), ("verdict", "unsafe")): 1,
        (("category", "S9"), ("stage", "output"), ("verdict", "unsafe")): 1,
        (("category", "other"), ("stage", "moderate"), ("verdict", "unsafe")): 1,
        (("category", "none"), ("stage", "input"), ("verdict", "error")): 1,
    }
    assert value(s, "sluice_guard_latency_seconds_count", stage="input") == 2
    assert value(s, "sluice_guard_latency_seconds_sum", stage="output") == 0.002
    assert category_labels(Verdict(False, ("S9", "S1", "S1"))) == ("S1", "S9")


def test_prefilter_outcomes_are_counted_from_zero() -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    s = sample_values(sink.registry)
    assert value(s, "sluice_guard_prefilter_checks_total", outcome="prefilter") == 0
    assert value(s, "sluice_guard_prefilter_checks_total", outcome="escalated") == 0
    for outcome in ("prefilter", "prefilter", "escalated"):
        sink.record_prefilter(outcome)
    s = sample_values(sink.registry)
    assert value(s, "sluice_guard_prefilter_checks_total", outcome="prefilter") == 2
    assert value(s, "sluice_guard_prefilter_checks_total", outcome="escalated") == 1


def test_held_flags_are_counted_by_outcome_from_zero() -> None:
    sink = PrometheusSink(CollectorRegistry(), process_metrics=False)
    s = sample_values(sink.registry)
    assert value(s, "sluice_guard_held_flags_total", outcome="confirmed") == 0
    assert value(s, "sluice_guard_held_flags_total", outcome="cleared") == 0
    sink.record_held_flags(confirmed=1, cleared=2)
    sink.record_held_flags(confirmed=0, cleared=1)
    s = sample_values(sink.registry)
    assert value(s, "sluice_guard_held_flags_total", outcome="confirmed") == 1
    assert value(s, "sluice_guard_held_flags_total", outcome="cleared") == 3


def test_engine_gauges_are_read_at_scrape_time() -> None:
    sink = PrometheusSink(CollectorRegistry(), guard_backend="classifier", process_metrics=False)
    assert value(sample_values(sink.registry), "sluice_requests_running") == 0  # no engine yet: no sample
    assert ("sluice_requests_running", ()) not in sample_values(sink.registry)
    engine = FakeEngine(FakeSpec(), EngineStats(running=2, waiting=5, slots=8, kv_bytes_used=250,
                                                kv_bytes_reserved=1000, steps=40, prompt_tokens=90,
                                                generation_tokens=30))
    sink.attach_engine(engine)
    s = sample_values(sink.registry)
    assert value(s, "sluice_requests_running") == 2
    assert value(s, "sluice_requests_waiting") == 5
    assert value(s, "sluice_engine_slots") == 8
    assert value(s, "sluice_kv_cache_usage_ratio") == 0.25
    assert value(s, "sluice_prompt_tokens_total") == 90
    assert value(s, "sluice_generation_tokens_total") == 30
    assert value(s, "sluice_engine_steps_total") == 40
    assert value(s, "sluice_model_info", model="tiny", precision="int4", guard_backend="classifier") == 1
    engine.current = replace(engine.current, running=0, generation_tokens=31)
    s = sample_values(sink.registry)  # a new scrape sees the new snapshot: nothing polls in between
    assert (value(s, "sluice_requests_running"), value(s, "sluice_generation_tokens_total")) == (0, 31)


def test_process_metrics_are_on_by_default() -> None:
    names = {k[0] for k in sample_values(PrometheusSink(CollectorRegistry()).registry)}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names


def test_start_metrics_serves_http_or_returns_a_null_sink() -> None:
    assert isinstance(start_metrics(Config(metrics=MetricsConfig(enabled=False))), NullSink)
    sink = start_metrics(Config(metrics=MetricsConfig(port=0)))
    try:
        assert isinstance(sink, PrometheusSink) and sink.endpoint is not None
        sink.record_request(RequestRecord("Generate", "eos", e2e_seconds=0.1))
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.endpoint.port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "sluice_e2e_request_latency_seconds_count 1.0" in body
        assert "_created" not in body  # classic text format: no doubled series
    finally:
        if isinstance(sink, PrometheusSink) and sink.endpoint is not None:
            sink.endpoint.close()
        enable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: restore for other tests


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose, by family type (histogram -> _bucket/_sum/_count, ...)."""
    names: set[str] = set()
    for fam in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count")}.get(fam.type, ("",))
        names.update(fam.name + suffix for suffix in suffixes)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series (not functions, keywords, labels or strings)."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", "", expr)  # numbers, 1e-9 included
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("$") and not re.fullmatch(r"\d.*", w)}


def dashboard_exprs(dashboard: dict[str, object]) -> list[str]:
    exprs: list[str] = []
    for panel in dashboard["panels"]:  # type: ignore[attr-defined]
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    for var in dashboard.get("templating", {}).get("list", []):  # type: ignore[attr-defined]
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if var.get("type") == "query" and query:
            exprs.append(re.sub(r"label_values\((\w+).*", r"\1", query))
    return exprs


def test_dashboard_parses_and_references_only_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 12, "the dashboard should chart TTFT, ITL, throughput, load, KV, guard and errors"
    referenced = set().union(*(promql_metric_names(e) for e in exprs))
    known = exposed_names(PrometheusSink(CollectorRegistry()).registry)
    assert referenced - known == set()
    for needed in ("sluice_time_to_first_token_seconds_bucket", "sluice_inter_token_latency_seconds_bucket",
                   "sluice_requests_running", "sluice_requests_waiting", "sluice_kv_cache_usage_ratio",
                   "sluice_guard_decisions_total", "sluice_requests_total", "sluice_generation_tokens_total"):
        assert needed in referenced


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (as recording rules, with Grafana's variables filled in)."""
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    filled = [e.replace("$__rate_interval", "5m").replace("$job", ".*") for e in exprs]
    rules = [{"record": f"sluice:dashboard_check_{i}", "expr": e} for i, e in enumerate(filled)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run `make tools-deb` (installs the Debian package prometheus)")
    return path


def test_alert_rules_pass_promtool_and_name_existing_metrics() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    exprs = re.findall(r"^\s+expr:\s*(?:\|\s*\n)?(.+?)(?=^\s+(?:for|labels|annotations):)", ALERTS.read_text(),
                       re.MULTILINE | re.DOTALL)
    assert len(exprs) >= 3
    referenced = set().union(*(promql_metric_names(e) for e in exprs))
    assert referenced - exposed_names(PrometheusSink(CollectorRegistry()).registry) == set()


RULE_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # 20 queue-full rejections a minute against 100 requests a minute
      - series: 'grpc_server_handled_total{{{svc},grpc_code="ResourceExhausted",{at}}}'
        values: '0+20x20'
      - series: 'grpc_server_handled_total{{{svc},grpc_code="OK",{at}}}'
        values: '0+80x20'
      # every TTFT observation above 5 s
      - series: 'sluice_time_to_first_token_seconds_bucket{{le="5.0",{at}}}'
        values: '0x20'
      - series: 'sluice_time_to_first_token_seconds_bucket{{le="+Inf",{at}}}'
        values: '0+10x20'
      # the guard backend fails on half its verdicts
      - series: 'sluice_guard_decisions_total{{stage="input",verdict="error",category="none",{at}}}'
        values: '0+5x20'
      - series: 'sluice_guard_decisions_total{{stage="input",verdict="safe",category="none",{at}}}'
        values: '0+5x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: SluiceQueueRejections
        exp_alerts:
          - exp_labels: {{severity: warning, job: sluice, instance: a}}
      - eval_time: 15m
        alertname: SluiceHighTimeToFirstToken
        exp_alerts:
          - exp_labels: {{severity: warning, job: sluice}}
      - eval_time: 15m
        alertname: SluiceGuardErrors
        exp_alerts:
          - exp_labels: {{severity: critical, job: sluice, stage: input}}
      - eval_time: 15m
        alertname: SluiceRequestErrors
        exp_alerts: []
"""


def without_annotations(rules_yaml: str) -> str:
    """The rule file minus its `annotations:` blocks (promtool compares them verbatim; labels are the test)."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in rules_yaml.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = indent if line.strip() == "annotations:" else None
        if skip_deeper_than is None:
            out.append(line)
    return "\n".join(out) + "\n"


def test_alerts_fire_on_the_series_they_watch(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires for the situation it describes, and only then."""
    rules = tmp_path / "alerts.yaml"
    rules.write_text(without_annotations(ALERTS.read_text()))
    assert "annotations" not in rules.read_text() and rules.read_text().count("- alert:") >= 5
    tests = tmp_path / "alerts_test.yaml"
    tests.write_text(textwrap.dedent(RULE_TESTS.format(alerts=json.dumps(str(rules)), at='job="sluice",instance="a"',
                                                       svc='grpc_service="sluice.v1.GenerationService"')))
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
