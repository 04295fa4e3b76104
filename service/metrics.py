"""Every Prometheus metric of the server, in one module, exposed on its own HTTP port at /metrics.

Sources (stats are data; this module only exports them):
- `RequestRecord`s from the pipeline (one per finished generation): the latency and size histograms.
- Guard `Verdict`s from the pipeline: decisions by stage, verdict and category; guard latency.
- `CallEnd`s from grpc_metrics.CallInterceptor (one per gRPC call): the grpc_server_* series, and
  sluice_requests_total, counted there once per Generate/Complete call (see grpc_metrics for why).
- `Engine.stats()`, read at scrape time by a custom collector (no polling thread): running / waiting
  requests, KV cache usage, slots, engine token and step totals.

Labels are bounded: RPC and method names, finish reasons, status codes, guard stages, verdicts and the
built-in category codes. Never request ids, prompts or user ids. Buckets are explicit and documented.
docs/METRICS.md lists every series with its meaning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, get_args
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from guard.moderator import Verdict
from guard.stream import PrefilterOutcome
from guard.taxonomy import BUILTIN_CODES
from service._pb.sluice.v1 import generation_pb2
from service.config import Config
from service.engine.types import FinishReason
from service.grpc_metrics import CallEnd, CallInfo, finish_reason_of
from service.stats import NullSink, RequestRecord, StatsSink

if TYPE_CHECKING:
    from service.engine.engine import EngineStats

log = logging.getLogger(__name__)

GENERATION_SERVICE: Final = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
# The RPCs that run a generation and therefore have a finish reason; the others (Tokenize, GetModelInfo,
# Moderate, health, reflection) are counted by grpc_server_handled_total only.
GENERATION_RPCS: Final = ("Generate", "Complete")
REJECTED: Final = "rejected"
FINISH_REASONS: Final = (*(r.value for r in FinishReason), REJECTED)
NO_CATEGORY: Final = "none"  # safe verdicts, and unsafe ones that name no category
OTHER_CATEGORY: Final = "other"  # a code outside the built-in taxonomy (custom categories), kept bounded
VERDICTS: Final = ("safe", "unsafe", "error")

# TTFT on CPU spans a few ms (short prompt, idle server) to tens of seconds (long prompt behind a full queue).
TTFT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                       5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Gaps between releases: one decode step (~10-50 ms here) up to a whole guard window judged at once.
ITL_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                      0.5, 0.75, 1.0, 2.5, 5.0)
# A whole request: up to max_new_tokens_cap (2048) tokens at a few tokens/s under load.
E2E_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 240.0, 480.0)
# Waiting for a slot: ~0 when idle; minutes only behind a full max_queue.
QUEUE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0, 120.0)
# Token counts, roughly x2 steps up to the 8192-token context of the default model (and beyond, for others).
TOKEN_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# The embedded classifier answers in ms; a Llama Guard backend in hundreds of ms; timeouts default to seconds.
GUARD_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Unary calls take ms; a streaming Generate lasts as long as its answer (minutes at the token cap).
GRPC_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                       300.0)

# go-grpc-prometheus's grpc_code values (Go's codes.Code.String()), so existing gRPC dashboards work.
GRPC_CODE_NAMES: Final = {
    grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled", grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument", grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound", grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied", grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition", grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange", grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal", grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss", grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
GRPC_LABELS: Final = ("grpc_type", "grpc_service", "grpc_method")


class ModelFacts(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def precision(self) -> str: ...


class EngineSource(Protocol):
    """What attach_engine reads: service.engine.engine.Engine satisfies it."""

    @property
    def spec(self) -> ModelFacts: ...

    def stats(self) -> EngineStats: ...


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Per-request series (from RequestRecords and call ends)."""

    requests: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    prompt_tokens: Histogram
    generation_tokens: Histogram

    @classmethod
    def create(cls, r: CollectorRegistry) -> RequestMetrics:
        requests = Counter("sluice_requests_total", "Generation requests (Generate, Complete) by how they ended; "
                           "rejected = refused before generating (bad argument, queue full, auth, draining).",
                           ["rpc", "finish_reason"], registry=r)
        for rpc in GENERATION_RPCS:  # every outcome exists from the start, so rate() and alerts see 0, not nothing
            for reason in FINISH_REASONS:
                requests.labels(rpc, reason)
        return cls(
            requests=requests,
            ttft=Histogram("sluice_time_to_first_token_seconds", "Request arrival to the first text released to "
                           "the client, including queueing and the input guard.", buckets=TTFT_BUCKETS, registry=r),
            itl=Histogram("sluice_inter_token_latency_seconds", "Gap between successive releases of text to the "
                          "client.", buckets=ITL_BUCKETS, registry=r),
            e2e=Histogram("sluice_e2e_request_latency_seconds", "Request arrival to its end, for requests the "
                          "pipeline finished.", buckets=E2E_BUCKETS, registry=r),
            queue=Histogram("sluice_request_queue_time_seconds", "Request arrival to getting an engine slot.",
                            buckets=QUEUE_BUCKETS, registry=r),
            prompt_tokens=Histogram("sluice_request_prompt_tokens", "Prompt tokens per finished request.",
                                    buckets=TOKEN_BUCKETS, registry=r),
            generation_tokens=Histogram("sluice_request_generation_tokens", "Generated tokens per finished "
                                        "request.", buckets=TOKEN_BUCKETS, registry=r),
        )


PREFILTER_OUTCOMES: tuple[PrefilterOutcome, ...] = get_args(PrefilterOutcome)


@dataclass(frozen=True, slots=True)
class GuardMetrics:
    """Guard verdicts (from the pipeline's record_verdict)."""

    decisions: Counter
    latency: Histogram
    prefilter: Counter
    held_flags: Counter

    @classmethod
    def create(cls, r: CollectorRegistry) -> GuardMetrics:
        m = cls(
            decisions=Counter("sluice_guard_decisions_total", "Guard verdicts by stage, verdict (safe, unsafe, "
                              "error = backend failed and the fail-open/closed policy decided) and category; a "
                              "verdict naming several categories counts once per category.",
                              ["stage", "verdict", "category"], registry=r),
            latency=Histogram("sluice_guard_latency_seconds", "Time one guard verdict took (an output check "
                              "that escalated from the prefilter: both reads).", ["stage"],
                              buckets=GUARD_BUCKETS, registry=r),
            prefilter=Counter("sluice_guard_prefilter_checks_total", "Output checks that read the prefilter's "
                              "short tail first, by outcome: prefilter (it settled the check) or escalated (the "
                              "full tail decided).", ["outcome"], registry=r),
            held_flags=Counter("sluice_guard_held_flags_total", "Flagged output checks held for the next check "
                               "to confirm (guard.output_confirm_score), by outcome: confirmed (the stream "
                               "stopped) or cleared (the held text was released); each also counts as an unsafe "
                               "output decision.",
                               ["outcome"], registry=r),
        )
        for outcome in PREFILTER_OUTCOMES:  # both series exist from the start, so rate() and ratios work
            m.prefilter.labels(outcome)
        for held in ("confirmed", "cleared"):
            m.held_flags.labels(held)
        return m


@dataclass(frozen=True, slots=True)
class GrpcMetrics:
    """The gRPC ecosystem's server series (go-grpc-prometheus names and labels)."""

    started: Counter
    handled: Counter
    handling: Histogram

    @classmethod
    def create(cls, r: CollectorRegistry) -> GrpcMetrics:
        return cls(
            started=Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS, registry=r),
            handled=Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                            (*GRPC_LABELS, "grpc_code"), registry=r),
            # No grpc_code label, as in go-grpc-prometheus, so existing gRPC dashboards' queries work unchanged.
            handling=Histogram("grpc_server_handling_seconds", "RPC duration on the server; streams over the "
                               "whole stream.", GRPC_LABELS, buckets=GRPC_BUCKETS, registry=r),
        )


# (metric name, help, EngineStats attribute). Counters are the engine's totals since start.
ENGINE_GAUGES: Final = (
    ("sluice_requests_running", "Requests holding an engine slot (prefilling or decoding).", "running"),
    ("sluice_requests_waiting", "Requests queued for an engine slot.", "waiting"),
    ("sluice_engine_slots", "Engine slots (engine.max_slots): the most requests decoded together.", "slots"),
    ("sluice_kv_cache_usage_ratio", "KV cache positions in use / reserved, 0 to 1.", "kv_usage_ratio"),
)
ENGINE_COUNTERS: Final = (
    ("sluice_prompt_tokens", "Prompt tokens prefilled by the engine (cancelled requests included).",
     "prompt_tokens"),
    ("sluice_generation_tokens", "Tokens generated by the engine (cancelled and blocked requests included).",
     "generation_tokens"),
    ("sluice_engine_steps", "Batched engine steps (one forward pass each).", "steps"),
)


class EngineCollector(Collector):
    """Reads Engine.stats() when Prometheus scrapes, on the HTTP server's thread (plain int reads)."""

    def __init__(self) -> None:
        self.engine: EngineSource | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.engine.stats() if self.engine is not None else None)

    @staticmethod
    def _families(stats: EngineStats | None) -> list[Metric]:
        out: list[Metric] = []
        for name, doc, attr in ENGINE_GAUGES:
            gauge = GaugeMetricFamily(name, doc)
            if stats is not None:
                gauge.add_metric([], float(getattr(stats, attr)))
            out.append(gauge)
        for name, doc, attr in ENGINE_COUNTERS:
            counter = CounterMetricFamily(name, doc)
            if stats is not None:
                counter.add_metric([], float(getattr(stats, attr)))
            out.append(counter)
        return out


class PrometheusSink:
    """StatsSink + CallObserver that writes into an injected registry.

    Args:
        registry: where every series lives (tests pass a fresh one and read it).
        guard_backend: for sluice_model_info (config guard.backend).
        process_metrics: add the default process_*, python_gc_* and python_info collectors.
    """

    def __init__(self, registry: CollectorRegistry, guard_backend: str = "none", process_metrics: bool = True) -> None:
        self.registry = registry
        self.guard_backend = guard_backend
        self.requests = RequestMetrics.create(registry)
        self.guard = GuardMetrics.create(registry)
        self.grpc = GrpcMetrics.create(registry)
        self.model_info = Gauge("sluice_model_info", "The served model (value 1).",
                                ["model", "precision", "guard_backend"], registry=registry)
        self.engine_collector = EngineCollector()
        self.endpoint: MetricsEndpoint | None = None  # set by start_metrics
        registry.register(self.engine_collector)
        if process_metrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def attach_engine(self, engine: EngineSource) -> None:
        """Export the engine's gauges (read at scrape time) and the model info.

        Args:
            engine: the generator engine.
        """
        self.engine_collector.engine = engine
        self.model_info.labels(engine.spec.name, engine.spec.precision, self.guard_backend).set(1)

    # -- StatsSink ---------------------------------------------------------------------------------------
    def record_request(self, record: RequestRecord) -> None:
        m = self.requests
        if record.ttft_seconds is not None:
            m.ttft.observe(record.ttft_seconds)
        for gap in record.inter_token_seconds:
            m.itl.observe(gap)
        m.e2e.observe(record.e2e_seconds)
        if record.queue_seconds is not None:
            m.queue.observe(record.queue_seconds)
        m.prompt_tokens.observe(record.prompt_tokens)
        m.generation_tokens.observe(record.completion_tokens)

    def record_verdict(self, verdict: Verdict) -> None:
        stage = verdict.stage.value
        label = "error" if verdict.error else "safe" if verdict.safe else "unsafe"
        for category in category_labels(verdict):
            self.guard.decisions.labels(stage, label, category).inc()
        self.guard.latency.labels(stage).observe(verdict.latency)

    def record_prefilter(self, outcome: PrefilterOutcome) -> None:
        self.guard.prefilter.labels(outcome).inc()

    def record_held_flags(self, confirmed: int, cleared: int) -> None:
        self.guard.held_flags.labels("confirmed").inc(confirmed)
        self.guard.held_flags.labels("cleared").inc(cleared)

    # -- CallObserver ------------------------------------------------------------------------------------
    def call_started(self, info: CallInfo) -> None:
        self.grpc.started.labels(info.kind, info.service, info.name).inc()

    def call_finished(self, end: CallEnd) -> None:
        i = end.info
        self.grpc.handled.labels(i.kind, i.service, i.name, GRPC_CODE_NAMES.get(end.code, "Unknown")).inc()
        self.grpc.handling.labels(i.kind, i.service, i.name).observe(end.seconds)
        if i.service == GENERATION_SERVICE and i.name in GENERATION_RPCS:
            reason = finish_reason_of(end)
            if reason is not None:
                self.requests.requests.labels(i.name, reason if reason in FINISH_REASONS else "error").inc()


def category_labels(verdict: Verdict) -> tuple[str, ...]:
    """The bounded category labels of a verdict: built-in codes, else "other"; "none" when it names none.

    Args:
        verdict: a guard verdict.

    Returns:
        One label per distinct category, sorted.
    """
    if not verdict.categories:
        return (NO_CATEGORY,)
    known = frozenset(BUILTIN_CODES)
    return tuple(sorted({c if c in known else OTHER_CATEGORY for c in verdict.categories}))


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """The /metrics HTTP server (a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve `registry` at http://host:port/metrics.

    Args:
        registry: what to expose.
        host: bind address.
        port: TCP port (0 picks a free one; read it from the result).

    Returns:
        The running endpoint.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)


def start_metrics(config: Config) -> StatsSink:
    """Build the sink the pipeline and the call interceptor report to, and serve it.

    Args:
        config: metrics.enabled / host / port, and guard.backend for sluice_model_info.

    Returns:
        A PrometheusSink (call `attach_engine` once the engine is loaded), or a NullSink when disabled.
    """
    if not config.metrics.enabled:
        return NullSink()
    # *_created samples mean something only in OpenMetrics; in the classic text format Prometheus would store
    # each as one more gauge series, doubling the series count for nothing. (prometheus_client: process-wide.)
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    sink = PrometheusSink(CollectorRegistry(), guard_backend=config.guard.backend.value)
    sink.endpoint = serve_metrics(sink.registry, config.metrics.host, config.metrics.port)
    log.info("metrics on http://%s:%d/metrics", config.metrics.host, sink.endpoint.port)
    return sink
