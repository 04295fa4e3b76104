"""Overload: with every slot busy and every queue place taken, new requests get RESOURCE_EXHAUSTED at once
(within REJECT_SECONDS, measured by the client from sending to the status), one by one and in a burst,
streaming and unary alike; the requests already admitted still finish completely, and afterwards the
server takes new work again.

The server has 2 slots and a queue of 4, so 6 requests fill it. The two that hold the slots are long
enough (200 greedy tokens of the counting prompt) that the probes end long before they do; the test
checks that the capacity was still full after the probes, so a probe can never have been admitted.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from service._pb.sluice.v1 import generation_pb2, generation_pb2_grpc
from service.client import as_complete_request
from service.errors import QueueFull
from tests.grpc.conftest import COUNTING_PROMPT, WAIT_SECONDS, Served, server_config, start_served
from tests.reliability.conftest import SubmitCounter, assert_idle, incomplete, percentile, record_figures, run_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

SLOTS, QUEUE = 2, 4
HOLD_TOKENS = 200  # the slot holders: far longer than the probes take
QUEUED_TOKENS = 12
PROBES = 20
BURST = 8
# The bound: a client over capacity learns it within 50 ms and can go to another replica.
REJECT_SECONDS = 0.050


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tight(model_dir: Path) -> AsyncIterator[Served]:
    s = await start_served(server_config(model_dir, "--max-slots", str(SLOTS), "--max-queue", str(QUEUE),
                                         "--max-context", "1024"))
    yield s
    await s.server.drain()


async def rejected_after(stub: generation_pb2_grpc.GenerationServiceStub, i: int) -> float:
    """Sends one request over capacity (Generate for even i, Complete for odd) and returns the seconds until
    its RESOURCE_EXHAUSTED arrived."""
    req = generation_pb2.GenerateRequest(request_id=f"probe-{i}", prompt=COUNTING_PROMPT, max_new_tokens=4)
    start = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if i % 2:
            await stub.Complete(as_complete_request(req), timeout=WAIT_SECONDS)
        else:
            async for _ in stub.Generate(req, timeout=WAIT_SECONDS):
                pass
    elapsed = time.perf_counter() - start
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, QueueFull.default_message)
    return elapsed


async def test_over_capacity_is_rejected_within_50ms_and_admitted_requests_finish(
        tight: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    submits = SubmitCounter(tight.engine, monkeypatch)
    eos = tight.engine.eos_ids
    async with grpc.aio.insecure_channel(tight.target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        await stub.Tokenize(generation_pb2.TokenizeRequest(prompt="warm"), timeout=WAIT_SECONDS)  # connected
        admitted = [generation_pb2.GenerateRequest(request_id=f"held-{i}", prompt=COUNTING_PROMPT,
                                                   max_new_tokens=HOLD_TOKENS if i < SLOTS else QUEUED_TOKENS)
                    for i in range(SLOTS + QUEUE)]
        tasks = []
        for n, req in enumerate(admitted, start=1):  # in order, so the slot holders are admitted first
            tasks.append(asyncio.create_task(run_stream(stub, req, timeout=WAIT_SECONDS * 4)))
            await submits.until(n)

        gc.collect()  # the test process's garbage from earlier tests must not pause the measured window
        one_by_one = [await rejected_after(stub, i) for i in range(PROBES)]
        burst = await asyncio.gather(*(rejected_after(stub, PROBES + i) for i in range(BURST)))
        stats = tight.engine.stats()
        assert stats.running + stats.waiting == SLOTS + QUEUE, "an admitted request ended during the probes"
        assert submits.count == SLOTS + QUEUE  # no probe reached the engine

        results = await asyncio.gather(*tasks)
        for req, r in zip(admitted, results, strict=True):
            assert incomplete(r, req, eos) is None, (req.request_id, r.code, r.details)
            assert r.final is not None and r.final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        await assert_idle(tight)
        again = await stub.Complete(generation_pb2.CompleteRequest(prompt=COUNTING_PROMPT, max_new_tokens=3),
                                    timeout=WAIT_SECONDS)
        assert again.final.usage.completion_tokens == 3

    record_figures("overload", {
        "slots": SLOTS, "queue": QUEUE, "probes": PROBES, "burst": BURST,
        "reject_p50_ms": round(1000 * percentile(one_by_one, 50), 2),
        "reject_max_ms": round(1000 * max(one_by_one), 2),
        "burst_reject_max_ms": round(1000 * max(burst), 2),
    })
    assert max(one_by_one) < REJECT_SECONDS, one_by_one
    assert max(burst) < REJECT_SECONDS, burst
