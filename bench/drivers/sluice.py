"""The Sluice engine through its own public API (`Engine.submit` / `iter_blocking`), in the project venv.

N streams are N requests submitted at once from N threads (as the servicer would), batched continuously
by the engine. `run_clients` adds the case peers cannot do: requests that keep joining while others run.
The engine stops at EOS (it has no ignore-EOS knob), so traces carry the tokens actually produced.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from bench.harness import StreamTrace
from service.engine.engine import Engine, EngineConfig
from service.engine.types import GenerationRequest, SamplingParams

# Waiting requests the engine may hold: above any stream count the bench submits at once.
MAX_QUEUE = 64


class SluiceDriver:
    """Greedy generation through the Sluice engine thread."""

    def __init__(self, model_dir: str, threads: int, context: int, max_slots: int) -> None:
        """Load and start the engine.

        Args:
            model_dir: our exported model folder.
            threads: onnxruntime intra-op threads.
            context: KV capacity per slot (`max_context`).
            max_slots: concurrent sequences (1 for the single-stream phase, so RSS reflects one stream).
        """
        config = EngineConfig(max_slots=max_slots, max_queue=MAX_QUEUE, intra_op_threads=threads, max_context=context)
        self._engine = Engine.load(Path(model_dir), config)
        self._engine.start()
        self._threads = threads
        self._max_slots = max_slots
        self._ids = itertools.count()

    def info(self) -> dict[str, object]:
        stats = self._engine.stats()
        return {
            "onnxruntime": version("onnxruntime"),
            "threads": self._threads,
            "max_slots": self._max_slots,
            "kv_bytes_reserved": stats.kv_bytes_reserved,
        }

    def encode(self, text: str) -> list[int]:
        """Our tokenizer (no BOS, special-token text stays text)."""
        return list(self._engine.tokenizer.encode_plain(text))

    def _run_one(self, ids: Sequence[int], max_new_tokens: int) -> StreamTrace:
        """Submit one request and consume its events, stamping each token as the caller receives it."""
        start = time.perf_counter()
        trace = StreamTrace(start=start)
        request = GenerationRequest(
            request_id=f"bench-{next(self._ids)}",
            prompt_ids=tuple(ids),
            sampling=SamplingParams(),
            max_new_tokens=max_new_tokens,
            arrival=start,
        )
        for event in self._engine.submit(request).iter_blocking():
            if event.token_id is not None:
                trace.add(event.token_id, time.perf_counter())
        return trace

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[StreamTrace]:
        """Submit every prompt at once (a barrier releases the threads together).

        Args:
            prompts: one id list per stream.
            max_new_tokens: upper bound per stream (EOS may stop a stream earlier).

        Returns:
            One trace per stream.
        """
        schedule = [[(list(ids), max_new_tokens)] for ids in prompts]
        return self.run_clients(schedule, gap_s=0.0)

    def run_clients(self, schedule: Sequence[Sequence[tuple[list[int], int]]], gap_s: float) -> list[StreamTrace]:
        """Closed-loop clients: client i starts `i * gap_s` after the first and runs its requests back to
        back, so new requests join while others are mid-decode (continuous batching).

        Args:
            schedule: per client, its (prompt ids, max_new_tokens) requests in order.
            gap_s: start offset between consecutive clients.

        Returns:
            One trace per request, in client order.
        """
        results: list[list[StreamTrace]] = [[] for _ in schedule]
        barrier = threading.Barrier(len(schedule))

        def client(index: int) -> None:
            barrier.wait()
            if gap_s > 0.0:
                time.sleep(index * gap_s)  # a scheduled arrival offset, once per client (not a poll)
            for ids, budget in schedule[index]:
                results[index].append(self._run_one(ids, budget))

        workers = [threading.Thread(target=client, args=(i,)) for i in range(len(schedule))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return [trace for per_client in results for trace in per_client]

    def close(self) -> None:
        """Stop the engine thread."""
        self._engine.stop()
