"""Faults: client cancels and disconnects mid-stream, deadlines (running and still queued), one request's
engine failure, and the guard backend failing. Each must end only the request concerned, with an explicit
outcome, and leave every slot free. SIGTERM during 16 live streams is in test_drain.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from guard.moderator import Stage, Verdict
from guard.policy import ERROR_BACKEND
from service._pb.sluice.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from service.engine import sequence as sequence_module
from service.engine.engine import RequestHandle
from service.errors import INTERNAL_MESSAGE
from tests.grpc.conftest import COUNTING_PROMPT, WAIT_SECONDS, Served, server_config
from tests.reliability.conftest import (
    OK,
    ScriptedModerator,
    StreamResult,
    SubmitCounter,
    assert_idle,
    guarded_front,
    incomplete,
    judged_safe,
    run_stream,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEEP, CANCEL = 4, 4  # streams that finish / streams the client cancels, together on the 8 slots
LONG = 400  # tokens: far more than the test ever lets a cancelled or expiring stream produce


def counting(request_id: str, max_new_tokens: int, **kw: Any) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id=request_id, prompt=COUNTING_PROMPT,
                                          max_new_tokens=max_new_tokens, **kw)


async def first_chunk(call: grpc.aio.UnaryStreamCall) -> None:
    resp = await asyncio.wait_for(call.read(), WAIT_SECONDS)
    assert resp is not grpc.aio.EOF and resp.HasField("chunk")


class StepLog:
    """Engine step counter at each cancel reaching the engine and at each slot release (per slot)."""

    def __init__(self, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
        engine, self.scheduler = served.engine, served.engine.scheduler
        self.cancelled_at: dict[int, int] = {}
        self.released_at: dict[int, list[int]] = {}
        cancel, release = engine._cancel, engine.kv.release

        def logged_cancel(handle: RequestHandle) -> None:
            seq = self.scheduler.running.get(handle)
            cancel(handle)
            if seq is not None:  # read the counter after the cancel is queued: it can only be later
                self.cancelled_at[seq.slot] = self.scheduler.steps

        def logged_release(slot: int) -> None:
            self.released_at.setdefault(slot, []).append(self.scheduler.steps)
            release(slot)

        monkeypatch.setattr(engine, "_cancel", logged_cancel)
        monkeypatch.setattr(engine.kv, "release", logged_release)

    def steps_to_free(self) -> dict[int, int]:
        """Per cancelled slot: engine steps completed between its cancel and its release (<= 1 expected)."""
        return {slot: min(s for s in self.released_at.get(slot, [10**9]) if s >= at) - at
                for slot, at in self.cancelled_at.items()}


async def test_cancels_and_disconnects_free_each_slot_within_one_engine_step(
        rel: Served, rel_stub: generation_pb2_grpc.GenerationServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = StepLog(rel, monkeypatch)
    eos = rel.engine.eos_ids
    keep_reqs = [counting(f"keep-{i}", 24 + 8 * i) for i in range(KEEP)]
    keep = [asyncio.create_task(run_stream(rel_stub, r)) for r in keep_reqs]
    doomed = [rel_stub.Generate(counting(f"cancel-{i}", LONG), timeout=WAIT_SECONDS) for i in range(CANCEL - 1)]
    async with grpc.aio.insecure_channel(rel.target) as lost:  # a client that vanishes: its connection closes
        vanishing = generation_pb2_grpc.GenerationServiceStub(lost).Generate(counting("vanish", LONG),
                                                                            timeout=WAIT_SECONDS)
        for call in (*doomed, vanishing):
            await first_chunk(call)
        for n, call in enumerate(doomed):  # cancelled at different points of their streams
            for _ in range(n):
                await call.read()
            call.cancel()
    # Leaving the block closed the vanishing client's channel under its open stream.
    for r, req in zip(await asyncio.gather(*keep), keep_reqs, strict=True):
        assert incomplete(r, req, eos) is None  # the others kept streaming to the end
    await assert_idle(rel)
    assert len(steps.cancelled_at) == CANCEL
    assert all(n <= 1 for n in steps.steps_to_free().values()), steps.steps_to_free()
    assert all(call.cancelled() for call in doomed)


async def test_deadlines_end_running_and_queued_requests_without_leaking_slots(
        rel: Served, rel_stub: generation_pb2_grpc.GenerationServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    slots = rel.engine.config.max_slots
    allocations: list[int] = []
    allocate = rel.engine.kv.allocate

    def counted_allocate() -> int:
        allocations.append(slot := allocate())
        return slot

    monkeypatch.setattr(rel.engine.kv, "allocate", counted_allocate)
    submits = SubmitCounter(rel.engine, monkeypatch)
    running = []
    for i in range(slots):  # hold every slot until their own, later deadline
        running.append(asyncio.create_task(run_stream(rel_stub, counting(f"run-{i}", LONG), timeout=4.0)))
        await submits.until(i + 1)
    # These wait in the queue and expire there: they never get a slot, so never cost engine work.
    queued = [asyncio.create_task(run_stream(rel_stub, counting(f"queued-{i}", LONG), timeout=1.0))
              for i in range(4)]
    results = await asyncio.gather(*running, *queued)
    for r in results:
        assert r.code is grpc.StatusCode.DEADLINE_EXCEEDED, (r.code, r.details)
    for r in results[slots:]:
        assert not r.ids and r.elapsed < 1.0 + 2.0  # ended at its deadline, not when a slot came free
    await assert_idle(rel)
    assert len(allocations) == slots


# -- one request fails inside the engine thread ----------------------------------------------------------------

class ExplodingSampler:
    """Delegates to a real sampler, but `sample` raises from its `fail_at`-th call (0 = the first token,
    which is sampled right after the prompt's prefill)."""

    def __init__(self, inner: object, fail_at: int) -> None:
        self._inner = inner
        self._fail_at = fail_at
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sample(self, logits: np.ndarray) -> Any:
        self._calls += 1
        if self._calls > self._fail_at:
            raise RuntimeError("sampler exploded (injected by the test)")
        return self._inner.sample(logits)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fail_at", [0, 3], ids=["at-first-token", "mid-stream"])
async def test_an_engine_failure_ends_only_its_request_with_internal(
        rel: Served, rel_stub: generation_pb2_grpc.GenerationServiceStub, monkeypatch: pytest.MonkeyPatch,
        fail_at: int) -> None:
    init = sequence_module.Sequence.__init__

    def init_with_exploding_sampler(self: sequence_module.Sequence, req: Any, *args: Any) -> None:
        init(self, req, *args)
        if req.request_id.startswith("explode"):
            self.sampler = ExplodingSampler(self.sampler, fail_at)  # type: ignore[assignment]

    monkeypatch.setattr(sequence_module.Sequence, "__init__", init_with_exploding_sampler)
    eos = rel.engine.eos_ids
    others = [counting(f"bystander-{i}", 40) for i in range(6)]
    tasks = [asyncio.create_task(run_stream(rel_stub, r)) for r in others]
    # Sampled, not greedy: greedy rows after the first token take a batched argmax that skips `sample`.
    boom = counting("explode", 40, sampling=generation_pb2.SamplingParams(temperature=0.8, seed=7))
    failed = await run_stream(rel_stub, boom)
    assert (failed.code, failed.details) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert len(failed.ids) <= fail_at
    for r, req in zip(await asyncio.gather(*tasks), others, strict=True):
        assert incomplete(r, req, eos) is None, (req.request_id, r.code, r.details)
    later = await run_stream(rel_stub, counting("after-explosion", 5))
    assert incomplete(later, counting("after-explosion", 5), eos) is None
    await assert_idle(rel)



# -- the guard backend fails -------------------------------------------------------------------------------------

GUARD_TIMEOUT = 0.3  # seconds; a backend slower than this counts as failed
GUARD_ARGS = ("--guard-backend", "classifier", "--guard-timeout-seconds", str(GUARD_TIMEOUT),
              "--guard-release-window-tokens", "4")


async def backend_down(stage: Stage) -> Verdict:
    raise RuntimeError("guard backend down (injected by the test)")


async def backend_hangs(stage: Stage) -> Verdict:
    await asyncio.sleep(WAIT_SECONDS)  # cancelled by the policy's timeout
    raise AssertionError("the guard timeout did not fire")


async def output_check_down(stage: Stage) -> Verdict:
    if stage is Stage.OUTPUT:
        raise RuntimeError("guard backend down for output checks (injected by the test)")
    return await judged_safe(stage)


async def through_guard(rel: Served, model_dir: Path, moderator: ScriptedModerator,
                        reqs: list[generation_pb2.GenerateRequest], *args: str) -> list[StreamResult]:
    """Runs `reqs` concurrently through a front over the suite's engine with `moderator` as the guard."""
    config = server_config(model_dir, *GUARD_ARGS, *args)
    async with guarded_front(rel, config, moderator) as front, grpc.aio.insecure_channel(front.target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        return list(await asyncio.gather(*(run_stream(stub, r) for r in reqs)))


def assert_error_verdict(v: common_pb2.GuardVerdict, *, safe: bool) -> None:
    assert (v.safe, v.error, v.backend) == (safe, True, ERROR_BACKEND)


@pytest.mark.parametrize("behave", [backend_down, backend_hangs], ids=["raises", "times-out"])
async def test_a_failing_guard_fails_closed_by_default(
        rel: Served, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        behave: Callable[[Stage], Awaitable[Verdict]]) -> None:
    submits = SubmitCounter(rel.engine, monkeypatch)
    [r] = await through_guard(rel, model_dir, ScriptedModerator(behave), [counting("guard-down", 8)])
    assert r.code is OK and r.finals == 1 and r.final is not None and not r.ids
    assert r.final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert_error_verdict(r.final.input_verdict, safe=False)
    assert r.elapsed < GUARD_TIMEOUT + 5.0
    if behave is backend_hangs:
        assert r.final.input_verdict.latency_seconds >= GUARD_TIMEOUT * 0.9
    assert submits.count == 0  # blocked before any engine work


async def test_an_output_check_failure_releases_nothing_unjudged_and_frees_the_slot(
        rel: Served, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submits = SubmitCounter(rel.engine, monkeypatch)
    mod = ScriptedModerator(output_check_down)
    [r] = await through_guard(rel, model_dir, mod, [counting("out-down", LONG)])
    assert r.code is OK and r.final is not None and not r.ids  # the first window was never cleared
    assert r.final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert (r.final.input_verdict.safe, r.final.input_verdict.error) == (True, False)
    assert_error_verdict(r.final.output_verdict, safe=False)
    assert submits.count == 1 and [s for _, _, s in mod.seen] == [Stage.INPUT, Stage.OUTPUT]
    await assert_idle(rel)  # the blocked generation was stopped, not left to run its 400 tokens


async def test_fail_open_is_configurable_and_a_request_can_still_ask_to_fail_closed(
        rel: Served, model_dir: Path) -> None:
    eos = rel.engine.eos_ids
    req = counting("open", 8)
    strict_req = counting("strict", 8, guard=common_pb2.GuardOptions(fail_closed=True))
    passed, strict = await through_guard(rel, model_dir, ScriptedModerator(backend_down), [req, strict_req],
                                         "--guard-fail-open")
    assert incomplete(passed, req, eos) is None and passed.final is not None
    assert_error_verdict(passed.final.input_verdict, safe=True)
    assert_error_verdict(passed.final.output_verdict, safe=True)
    assert strict.code is OK and strict.final is not None and not strict.ids
    assert strict.final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert_error_verdict(strict.final.input_verdict, safe=False)


async def test_an_intermittently_failing_guard_under_concurrency_never_hangs_or_leaks(
        rel: Served, model_dir: Path) -> None:
    calls = itertools.count()

    async def flaky(stage: Stage) -> Verdict:
        if next(calls) % 3 == 2:
            raise RuntimeError("intermittent guard failure (injected by the test)")
        return await judged_safe(stage)

    eos = rel.engine.eos_ids
    reqs = [counting(f"flaky-{i}", 6 + i) for i in range(16)]
    results = await through_guard(rel, model_dir, ScriptedModerator(flaky), reqs)
    blocked = 0
    for req, r in zip(reqs, results, strict=True):
        assert r.code is OK and r.final is not None, (r.code, r.details)
        if r.final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER:
            blocked += 1
            assert r.final.input_verdict.error or r.final.output_verdict.error
        else:
            assert incomplete(r, req, eos) is None
    assert 0 < blocked < len(reqs)
    await assert_idle(rel)
