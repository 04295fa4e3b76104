"""The copying KV path (for graphs whose present is a new past+seq tensor) gives the same tokens as the
shared-buffer path, with batching and chunked prefill in play."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.engine.engine import Engine, EngineConfig
from service.engine.types import GenerationRequest


def _run(model_dir: Path, cases: list[dict[str, Any]], copying: bool) -> list[list[int | None]]:
    engine = Engine.load(model_dir, EngineConfig(max_slots=4, prefill_chunk=16, force_copying_kv=copying))
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(request_id=str(i), prompt_ids=tuple(c["prompt_ids"]),
                                                   max_new_tokens=12), loop=None)
                   for i, c in enumerate(cases)]
        return [[ev.token_id for ev in h.iter_blocking()] for h in handles]
    finally:
        engine.stop()


def test_copying_kv_path_matches_shared_buffer(model_dir: Path, greedy_cases: list[dict[str, Any]]) -> None:
    shared = _run(model_dir, greedy_cases, copying=False)
    copying = _run(model_dir, greedy_cases, copying=True)
    assert copying == shared
    assert all(len(tokens) >= 2 for tokens in shared)
