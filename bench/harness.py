"""What every system is asked to do, measured the same way: one driver per system, one harness for all.

Standard library only (the peer workers run in the bench venv without the project). A driver turns
prompts (token ids) into `StreamTrace`s: when each stream was submitted and when each of its tokens
became available to the caller. Every figure below is computed from those wall-clock timestamps, so the
three systems are timed by the same code, never by their own counters.

Definitions (all wall clock, `time.perf_counter`):
- TTFT: submit -> first generated token available; prefill tok/s = prompt tokens / TTFT (1 new token).
- decode tok/s: (tokens - 1) / (last token - first token) for one stream asked for `new_tokens` tokens.
- aggregate tok/s at N streams: all completion tokens / (last token of any stream - first submit).
- aggregate decode tok/s at N streams: tokens after each stream's first / (last token - earliest first
  token): the decode-only throughput, prefill excluded.
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bench.prompts import ids_digest, prompt_ids

# Generated tokens of the warm-up request: enough to touch every code path (prefill, decode) once.
WARMUP_NEW_TOKENS = 8


@dataclass(frozen=True)
class Job:
    """What the orchestrator asks one worker process to do (sent as JSON on stdin)."""

    model_dir: str
    gguf: str
    threads: int = 2
    runs: int = 5
    prompt_lengths: tuple[int, ...] = (128, 512)
    new_tokens: int = 128
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    context: int = 1024  # KV capacity per sequence, the same for every system
    sustained_clients: int = 8  # Sluice only: closed-loop clients whose requests keep joining
    sustained_requests: int = 3  # requests per client, run back to back
    sustained_gap_s: float = 0.15  # client i starts i * gap after the first

    @staticmethod
    def from_json(data: dict[str, object]) -> Job:
        """Build a Job from its JSON form; tuples arrive as lists.

        Args:
            data: the decoded JSON object.

        Returns:
            The job.
        """
        fields: dict[str, object] = dict(data)
        for name in ("prompt_lengths", "concurrency"):
            value = fields.get(name)
            if isinstance(value, list):
                fields[name] = tuple(int(n) for n in value)
        return Job(**fields)  # type: ignore[arg-type]


@dataclass
class StreamTrace:
    """One stream's timestamps (seconds, perf_counter) and the token ids it produced."""

    start: float
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, token: int, at: float) -> None:
        """Record one generated token and when the caller received it."""
        self.tokens.append(token)
        self.token_times.append(at)

    @property
    def n_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    def decode_rate(self) -> float:
        """Tokens per second after the first token; 0.0 when fewer than two tokens came."""
        if self.n_tokens < 2:
            return 0.0
        return (self.n_tokens - 1) / (self.token_times[-1] - self.token_times[0])


class Driver(Protocol):
    """One system under test, living in its own worker process."""

    def encode(self, text: str) -> list[int]: ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[StreamTrace]: ...

    def info(self) -> dict[str, object]: ...


def aggregate_rate(traces: Sequence[StreamTrace]) -> float:
    """All completion tokens over the span from the first submit to the last token of any stream.

    Args:
        traces: the streams run together.

    Returns:
        Tokens per second (0.0 when nothing was generated).
    """
    done = [t for t in traces if t.token_times]
    if not done:
        return 0.0
    span = max(t.token_times[-1] for t in done) - min(t.start for t in traces)
    return sum(t.n_tokens for t in done) / span


def decode_aggregate_rate(traces: Sequence[StreamTrace]) -> float:
    """Tokens after each stream's first, over the span from the earliest first token to the last token.

    Args:
        traces: the streams run together.

    Returns:
        Tokens per second (0.0 when no stream produced a second token).
    """
    done = [t for t in traces if t.n_tokens >= 2]
    if not done:
        return 0.0
    span = max(t.token_times[-1] for t in done) - min(t.token_times[0] for t in done)
    return sum(t.n_tokens - 1 for t in done) / span


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Recorder:
    """Collects samples per metric key and the prompt digests a worker actually ran."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.digests: dict[str, str] = {}
        self.notes: list[str] = []
        self.greedy_ids: list[int] = []  # the single-stream decode's tokens: every system should agree

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def build_prompts(driver: Driver, n_streams: int, length: int, rec: Recorder) -> list[list[int]]:
    """Tokenize the first `n_streams` stream prompts with the driver's own tokenizer, recording digests.

    Args:
        driver: the system (its own tokenizer).
        n_streams: how many distinct prompts.
        length: exact prompt length in tokens.
        rec: where the digests go, keyed `s{index}_{length}`.

    Returns:
        One id list per stream.
    """
    prompts = [prompt_ids(driver.encode, i, length) for i in range(n_streams)]
    for i, ids in enumerate(prompts):
        rec.digests[f"s{i}_{length}"] = ids_digest(ids)
    return prompts


def run_single_phase(driver: Driver, job: Job) -> Recorder:
    """Prefill (TTFT) at each prompt length and single-stream decode, `job.runs` times after a warm-up.

    Args:
        driver: the system under test.
        job: sizes and repetitions.

    Returns:
        The recorder with `ttft_{P}_ms`, `prefill_{P}_tok_s`, `decode_tok_s`, `decode_tokens`.
    """
    rec = Recorder()
    by_length = {p: build_prompts(driver, 1, p, rec)[0] for p in job.prompt_lengths}
    decode_prompt = by_length[min(job.prompt_lengths)]
    driver.generate([decode_prompt], WARMUP_NEW_TOKENS)
    for _ in range(job.runs):
        for length, ids in by_length.items():
            trace = driver.generate([ids], 1)[0]
            rec.add(f"ttft_{length}_ms", trace.ttft * 1000.0)
            rec.add(f"prefill_{length}_tok_s", length / trace.ttft)
        trace = driver.generate([decode_prompt], job.new_tokens)[0]
        rec.greedy_ids = trace.tokens
        rec.add("decode_tok_s", trace.decode_rate())
        rec.add("decode_tokens", float(trace.n_tokens))
    _note_short(rec, "decode_tokens", job.new_tokens)
    return rec


def run_concurrent_phase(driver: Driver, job: Job) -> Recorder:
    """Aggregate throughput with N streams submitted at once, for each N in `job.concurrency`.

    Args:
        driver: the system under test.
        job: sizes and repetitions.

    Returns:
        The recorder with `agg_c{N}_tok_s`, `agg_decode_c{N}_tok_s`, `agg_c{N}_tokens` and `ttft_c{N}_ms`
        (mean over streams).
    """
    rec = Recorder()
    length = min(job.prompt_lengths)
    prompts = build_prompts(driver, max(job.concurrency), length, rec)
    driver.generate(prompts[:1], WARMUP_NEW_TOKENS)
    for n in job.concurrency:
        for _ in range(job.runs):
            traces = driver.generate(prompts[:n], job.new_tokens)
            rec.add(f"agg_c{n}_tok_s", aggregate_rate(traces))
            rec.add(f"agg_decode_c{n}_tok_s", decode_aggregate_rate(traces))
            rec.add(f"agg_c{n}_tokens", float(sum(t.n_tokens for t in traces)))
            rec.add(f"ttft_c{n}_ms", statistics.fmean(t.ttft for t in traces if t.token_times) * 1000.0)
        _note_short(rec, f"agg_c{n}_tokens", n * job.new_tokens)
    return rec


@runtime_checkable
class ClientDriver(Driver, Protocol):
    """A driver that can also run closed-loop clients whose requests join a running batch."""

    def run_clients(self, schedule: Sequence[Sequence[tuple[list[int], int]]], gap_s: float) -> list[StreamTrace]: ...


# Per-request budgets of the sustained run as fractions of `new_tokens` (mean 1.0): requests of unequal
# length finish at different steps, so slots free up mid-batch and waiting requests join.
SUSTAINED_BUDGETS = (0.75, 1.0, 1.25)


def run_sustained_phase(driver: ClientDriver, job: Job, rec: Recorder) -> None:
    """`job.sustained_clients` clients, staggered starts, each running `job.sustained_requests` requests.

    Args:
        driver: a system with continuous batching.
        job: sizes and repetitions.
        rec: gets `sustained_tok_s`, `sustained_tokens` and `sustained_ttft_ms` (mean over requests).
    """
    clients, per_client = job.sustained_clients, job.sustained_requests
    prompts = build_prompts(driver, clients * per_client, min(job.prompt_lengths), rec)
    schedule = [
        [(prompts[c * per_client + r], int(job.new_tokens * SUSTAINED_BUDGETS[(c + r) % 3])) for r in range(per_client)]
        for c in range(clients)
    ]
    for _ in range(job.runs):
        traces = driver.run_clients(schedule, job.sustained_gap_s)
        rec.add("sustained_tok_s", aggregate_rate(traces))
        rec.add("sustained_tokens", float(sum(t.n_tokens for t in traces)))
        rec.add("sustained_ttft_ms", statistics.fmean(t.ttft for t in traces if t.token_times) * 1000.0)
    _note_short(rec, "sustained_tokens", sum(budget for requests in schedule for _, budget in requests))


def _note_short(rec: Recorder, key: str, expected: int) -> None:
    """Record a note when a system produced fewer tokens than asked (it stopped at EOS)."""
    got = min(rec.samples.get(key, [float(expected)]))
    if got < expected:
        rec.notes.append(f"{key}: at least one run produced {int(got)} of {expected} tokens (EOS)")
