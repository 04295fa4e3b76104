"""Continuous batching with the real model: greedy requests of different lengths running together give the
tokens each gives alone, while a long prompt is prefilled in chunks between decode steps of the others.

Batched kernels may sum in another order than batch-of-one kernels, so a token can legitimately differ
where the top two logits are nearly tied. The test accepts a divergence only there: it recomputes the
logits at the first differing position with a plain onnxruntime run and requires the two candidates to be
the top two, less than `NEAR_TIE` apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from service.engine.engine import Engine
from service.engine.types import FinishReason, GenerationRequest, TokenEvent
from tests.model.conftest import PlainLM, token_ids

NEW_TOKENS = 12
NEAR_TIE = 0.05  # logits; the fp32 reference's own first-step margins go down to 0.01
SHORT_PROMPTS = (
    "Hi!",
    "Name three colours.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "List the planets of the solar system in order from the sun, with one fact about each of them.",
)
LONG_PROMPT = "Summarise this text in one sentence. " + " ".join(
    f"Paragraph {i}: the river carries silt from the mountains to the delta, where farmers grow rice."
    for i in range(12)
)

GreedyAlone = Callable[[Sequence[int], int], list[int]]
ChatIds = Callable[[str], tuple[int, ...]]


def _explain_divergence(plain_lm: PlainLM, prompt: Sequence[int], alone: list[int], batched: list[int]) -> str | None:
    """None when the sequences agree, or differ first at a near-tie; else a description of the failure."""
    d = next((i for i, (a, b) in enumerate(zip(alone, batched, strict=False)) if a != b), None)
    if d is None:
        return None if len(alone) == len(batched) else f"lengths differ: {len(alone)} vs {len(batched)}"
    logits = plain_lm.last_logits([*prompt, *alone[:d]])
    top2 = np.argsort(logits)[-2:][::-1]
    margin = float(logits[top2[0]] - logits[top2[1]])
    if {alone[d], batched[d]} == set(top2.tolist()) and margin < NEAR_TIE:
        return None
    return f"diverged at {d}: alone {alone[d]}, batched {batched[d]}, top2 {top2.tolist()} margin {margin:.4f}"


async def test_batched_greedy_equals_each_alone(engine: Engine, chat_ids: ChatIds, plain_lm: PlainLM,
                                                greedy_cases: list[dict[str, Any]],
                                                greedy_alone: GreedyAlone) -> None:
    prompts = [tuple(c["prompt_ids"]) for c in greedy_cases] + [chat_ids(p) for p in SHORT_PROMPTS]
    long_prompt = chat_ids(LONG_PROMPT)
    assert len(long_prompt) > engine.config.prefill_chunk  # so it is prefilled in more than one step
    prompts.append(long_prompt)  # last: it is prefilled while the others already decode
    assert len(prompts) == engine.config.max_slots and len({len(p) for p in prompts}) == len(prompts)
    alone = [greedy_alone(p, NEW_TOKENS) for p in prompts]

    received: list[list[tuple[float, TokenEvent]]] = [[] for _ in prompts]

    async def consume(i: int) -> None:
        handle = engine.submit(GenerationRequest(f"b{i}", prompts[i], max_new_tokens=NEW_TOKENS))
        async for ev in handle:
            received[i].append((time.perf_counter(), ev))

    await asyncio.gather(*(consume(i) for i in range(len(prompts))))

    batched = [token_ids([ev for _, ev in r]) for r in received]
    problems = {i: why for i, (p, a, b) in enumerate(zip(prompts, alone, batched, strict=True))
                if (why := _explain_divergence(plain_lm, p, a, b)) is not None}
    assert problems == {}
    for r in received:
        assert r[-1][1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    # Chunked prefill did not stall the others: each short request already had tokens streamed before
    # the long prompt's first token came out.
    long_first = received[-1][0][0]
    assert all(sum(t < long_first for t, _ in r) >= 2 for r in received[:-1])
