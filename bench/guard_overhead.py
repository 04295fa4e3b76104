"""What the moderation stage adds to latency, end to end over gRPC on loopback.

Runs the same chat requests against one in-process server twice per round, with the guard off
(`--guard-backend none`) and on (the embedded classifier, default window), alternating to spread machine
noise, and reports medians of client-side TTFT, per-token latency (per chunk, and TPOT per request) and
aggregate tokens/s per configuration and their ratios. `--concurrency N` runs N streams of each prompt at once
(the engine batches them); `--stagger S` starts the i-th of them S*i seconds late, so requests arrive while
others stream and their input verdicts meet other streams' output checks (as in real traffic).

    python -m bench.guard_overhead --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from guard.stream import first_window_size
from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from service.app import build_app, start
from service.config import load_config
from service.server import start_server
from service.stats import ListSink

PROMPTS = (
    "What is the capital of Japan?",
    "Write a short poem about rivers.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning a new language.",
)


@dataclass(frozen=True)
class _Stream:
    """One request as the client saw it: seconds from sending to each chunk, and tokens so far after it."""

    times: list[float]
    tokens: list[int]

    @property
    def ttft(self) -> float:
        return self.times[0]

    def time_to(self, n: int) -> float | None:
        """Seconds until the first chunk holding `n` tokens in all. With n = the guard's first release window
        this compares TTFT without the window's own wait: a guarded stream releases its first text only then,
        an unguarded one has streamed those tokens by then."""
        return next((t for t, k in zip(self.times, self.tokens, strict=True) if k >= n), None)

    def itl(self) -> list[float]:
        """Per chunk after the first: its gap divided by its tokens."""
        return [(t1 - t0) / max(1, n1 - n0)
                for t0, t1, n0, n1 in zip(self.times, self.times[1:], self.tokens, self.tokens[1:], strict=False)]

    def tpot(self, after: int) -> float | None:
        """Seconds per token from the first chunk holding `after` tokens to the last chunk (vLLM's TPOT over
        the same token span in both configurations: a guarded stream's first release holds `after` tokens, so
        unguarded streams are measured from their `after`-th token, not from their first)."""
        for t, n in zip(self.times, self.tokens, strict=True):
            if n >= after:
                later = self.tokens[-1] - n
                return (self.times[-1] - t) / later if later > 0 else None
        return None


async def _one(stub: generation_pb2_grpc.GenerationServiceStub, text: str, max_new: int,
               delay: float = 0.0) -> _Stream:
    await asyncio.sleep(delay)
    msgs = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=text)])
    start_t = time.perf_counter()
    times: list[float] = []
    tokens: list[int] = []
    async for resp in stub.Generate(generation_pb2.GenerateRequest(messages=msgs, max_new_tokens=max_new)):
        if resp.HasField("chunk"):
            times.append(time.perf_counter() - start_t)
            tokens.append((tokens[-1] if tokens else 0) + len(resp.chunk.token_ids))
    return _Stream(times, tokens)


async def main_async(model: Path, rounds: int, max_new: int, encoder_threads: int = 1,
                     first_window: int | None = None, encoder: Path | None = None,
                     head: Path | None = None, concurrency: int = 1, stagger: float = 0.0,
                     prefilter_chars: int | None = None, server_args: tuple[str, ...] = ()) -> dict[str, object]:
    base_args = ["--port", "0", "--no-metrics-enabled", "--model", str(model)]
    app, srv = await start(load_config([*base_args, "--guard-backend", "none"], env={}))
    guard_args = [] if first_window is None else ["--guard-first-release-window-tokens", str(first_window)]
    guard_args += [] if encoder is None else ["--guard-encoder", str(encoder)]
    guard_args += [] if head is None else ["--guard-head", str(head)]
    guard_args += [] if prefilter_chars is None else ["--guard-output-prefilter-chars", str(prefilter_chars)]
    guarded_cfg = load_config([*base_args, "--guard-backend", "classifier",
                               "--guard-encoder-threads", str(encoder_threads), *guard_args, *server_args], env={})
    verdicts = ListSink()
    gapp = build_app(guarded_cfg, app.engine, stats=verdicts)
    gsrv = await start_server(guarded_cfg, gapp.generation, gapp.moderation, gapp.life, None)
    await gsrv.set_serving(True)
    first_release = first_window_size(guarded_cfg.guard.release_window_tokens,
                                      guarded_cfg.guard.first_release_window_tokens)
    results: dict[str, dict[str, list[float]]] = {
        "none": {"ttft": [], "ttfw": [], "itl": [], "tpot": [], "tok_s": []},
        "classifier": {"ttft": [], "ttfw": [], "itl": [], "tpot": [], "tok_s": []},
    }
    try:
        for _ in range(rounds):
            for name, port in (("none", srv.port), ("classifier", gsrv.port)):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = generation_pb2_grpc.GenerationServiceStub(ch)
                    for p in PROMPTS:  # `concurrency` streams of the same prompt at once (or staggered)
                        started = time.perf_counter()
                        runs = await asyncio.gather(*(_one(stub, p, max_new, stagger * i) for i in range(concurrency)))
                        wall = time.perf_counter() - started
                        for run in (r for r in runs if r.times):
                            results[name]["ttft"].append(run.ttft)
                            ttfw = run.time_to(first_release)
                            if ttfw is not None:
                                results[name]["ttfw"].append(ttfw)
                            results[name]["itl"].extend(run.itl())
                            tpot = run.tpot(first_release)
                            if tpot is not None:
                                results[name]["tpot"].append(tpot)
                        results[name]["tok_s"].append(sum(r.tokens[-1] for r in runs if r.tokens) / wall)
    finally:
        await gsrv.server.stop(0)
        await srv.drain()
    med = {n: {k: statistics.median(v) for k, v in r.items() if v} for n, r in results.items()}
    by_stage: dict[str, list[float]] = {}
    for v in verdicts.verdicts:
        by_stage.setdefault(v.stage.value, []).append(v.latency)
    verdict_median = {k: statistics.median(v) for k, v in by_stage.items()}
    return {
        "verdict_latency_median_seconds": verdict_median,
        "input_verdict_share_of_unguarded_ttft": verdict_median.get("input", 0.0) / med["none"]["ttft"],
        "verdicts": {k: len(v) for k, v in by_stage.items()},
        "note": "guarded TTFT includes the input verdict and the first release window (its tokens generated "
        "and judged before the first text is released); ttfw is the time until the first window's tokens have "
        "arrived in either configuration, so its ratio is the guard's cost without the window's own wait; itl "
        "is per token",
        "rounds": rounds,
        "encoder_threads": encoder_threads,
        "server_args": list(server_args),
        "encoder": str(guarded_cfg.guard.encoder),
        "head": str(guarded_cfg.guard.head),
        "release_windows": {"first": guarded_cfg.guard.first_release_window_tokens,
                            "window": guarded_cfg.guard.release_window_tokens},
        "output_chars": {"context": guarded_cfg.guard.output_context_chars,
                         "prefilter": guarded_cfg.guard.output_prefilter_chars},
        "concurrency": concurrency,
        "stagger_seconds": stagger,
        "requests_per_config": rounds * len(PROMPTS) * concurrency,
        "max_new_tokens": max_new,
        # Seconds, and aggregate tokens/s. itl: each chunk's gap over its tokens, one value per chunk (a guarded
        # stream's bursts make its short chunks count as much as its full windows); tpot: per request, seconds
        # per token after the first release window's worth of tokens, the rate a client receives text at.
        "medians": med,
        "ratio_guarded_over_none": {k: med["classifier"][k] / med["none"][k] for k in med["none"]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.guard_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("models/smollm2-135m-instruct-int4"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--encoder-threads", type=int, default=1, help="guard.encoder_threads of the guarded server")
    ap.add_argument("--first-window", type=int, default=None,
                    help="guard.first_release_window_tokens of the guarded server (default: the config default)")
    ap.add_argument("--encoder", type=Path, default=None, help="guard.encoder (default: the config default)")
    ap.add_argument("--head", type=Path, default=None, help="guard.head (default: the config default)")
    ap.add_argument("--concurrency", type=int, default=1, help="streams of each prompt run at once")
    ap.add_argument("--stagger", type=float, default=0.0, help="seconds between the starts of those streams")
    ap.add_argument("--prefilter-chars", type=int, default=None,
                    help="guard.output_prefilter_chars of the guarded server (0 = off; default: the config default)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra `serve` option for the guarded server, repeatable "
                         "(--server-arg=--no-guard-encoder-turns); passed after the named flags above, so it "
                         "overrides them (--server-arg=--guard-head=H wins over --head)")
    a = ap.parse_args()
    out = asyncio.run(main_async(a.model, a.rounds, a.max_new_tokens, a.encoder_threads, a.first_window,
                                 a.encoder, a.head, a.concurrency, a.stagger,
                                 a.prefilter_chars, tuple(a.server_arg)))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
