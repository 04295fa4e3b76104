"""SIGTERM during 16 live streams, on a real `python -m service serve` process: health flips to NOT_SERVING,
new calls are refused with UNAVAILABLE, every stream either finishes completely within the grace or ends
with UNAVAILABLE (never a silent cut or a hang), and the process exits 0 soon after the grace.

Reuses the process harness of tests/grpc/test_lifecycle.py, which covers the 3-stream case.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._pb.sluice.v1 import generation_pb2, generation_pb2_grpc
from tests.grpc.conftest import BASE_ARGS, COUNTING_PROMPT, WAIT_SECONDS
from tests.grpc.test_lifecycle import DRAINING_MESSAGE, NOT_SERVING, SERVING, next_status, statuses, with_process
from tests.reliability.conftest import OK, StreamResult, incomplete, record_figures, run_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

STREAMS = 16
SHORT, LONG = 6, 900  # tokens: a few finish well within the grace; 900 cannot on any machine
SHORT_STREAMS = 6
GRACE = 4.0
# After the grace: engine stop, server.stop(1 s), interpreter exit; generous for a loaded CI machine.
EXIT_MARGIN = 10.0
EOS_IDS = frozenset({2})  # <|im_end|>: SmolLM2's end of sequence (a short stream may end with it)


async def test_sigterm_during_16_live_streams_drains_refuses_and_exits_zero(model_dir: Path) -> None:
    args = [*BASE_ARGS, "--model", str(model_dir), "--max-slots", str(STREAMS), "--max-context", "512",
            "--grace-seconds", str(GRACE)]
    reqs = [generation_pb2.GenerateRequest(request_id=f"live-{i}", prompt=COUNTING_PROMPT,
                                           max_new_tokens=SHORT if i < SHORT_STREAMS else LONG)
            for i in range(STREAMS)]
    log: list[str] = []
    results: list[StreamResult] = []
    refused: list[grpc.aio.AioRpcError] = []
    refused_stream: list[StreamResult] = []
    signalled = 0.0

    async def body(proc: asyncio.subprocess.Process, port: int) -> None:
        nonlocal signalled
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert await statuses(ch) == {SERVING}
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            live = [asyncio.Event() for _ in reqs]
            tasks = [asyncio.create_task(run_stream(stub, r, timeout=60, started=e))
                     for r, e in zip(reqs, live, strict=True)]
            async with asyncio.timeout(WAIT_SECONDS * 2):
                await asyncio.gather(*(e.wait() for e in live))  # all 16 have produced a token
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert await next_status(watch) == SERVING
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await next_status(watch) == NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Complete(generation_pb2.CompleteRequest(prompt="hi", max_new_tokens=1), timeout=5)
            refused.append(unary.value)
            late = await run_stream(stub, generation_pb2.GenerateRequest(prompt="hi", max_new_tokens=1), timeout=5)
            refused_stream.append(late)
            results.extend(await asyncio.gather(*tasks))

    assert await with_process(args, body, log) == 0, "".join(log)
    exited_after = time.monotonic() - signalled
    assert [(e.code(), e.details()) for e in refused] == [(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)]
    assert [(r.code, r.details, r.ids) for r in refused_stream] == [(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE, [])]
    outcomes = []
    for req, r in zip(reqs, results, strict=True):
        if r.code is OK:
            assert incomplete(r, req, EOS_IDS) is None, req.request_id
            outcomes.append("final")
        else:
            assert (r.code, r.details) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE), req.request_id
            outcomes.append("UNAVAILABLE")
    assert outcomes == ["final"] * SHORT_STREAMS + ["UNAVAILABLE"] * (STREAMS - SHORT_STREAMS)
    assert exited_after < GRACE + EXIT_MARGIN
    assert not any("Traceback" in line for line in log), "".join(log)
    record_figures("sigterm", {"streams": STREAMS, "grace_seconds": GRACE, "finished": outcomes.count("final"),
                               "unavailable": outcomes.count("UNAVAILABLE"),
                               "exit_seconds_after_sigterm": round(exited_after, 2)})

