"""The guard's one-thread priority worker, and the classifier putting input verdicts first on it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future

import numpy as np
import pytest

from guard.backends.classifier import ClassifierModerator
from guard.features import FeatureBatch
from guard.moderator import Role, Stage
from guard.worker import DEFAULT_PRIORITY, URGENT, PriorityWorker
from tests.unit.test_classifier import FakeExtractor, conv, tiny_head


def blocked(worker: PriorityWorker) -> tuple[threading.Event, Future[None]]:
    """Occupy the worker until the returned event is set, so later calls queue."""
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(5)

    fut = worker.submit(hold)
    assert started.wait(5)
    return gate, fut


def test_runs_lower_priority_values_first_and_fifo_within_one() -> None:
    worker = PriorityWorker("t-worker")
    gate, _ = blocked(worker)
    ran: list[str] = []
    futures = [worker.submit_at(DEFAULT_PRIORITY, ran.append, "out1"),
               worker.submit_at(DEFAULT_PRIORITY, ran.append, "out2"),
               worker.submit_at(URGENT, ran.append, "in1"),
               worker.submit(ran.append, "out3"),
               worker.submit_at(URGENT, ran.append, "in2")]
    gate.set()
    for f in futures:
        f.result(5)
    assert ran == ["in1", "in2", "out1", "out2", "out3"]
    worker.shutdown()


def test_results_exceptions_and_the_thread_name() -> None:
    worker = PriorityWorker("t-named")
    assert worker.submit(lambda: threading.current_thread().name).result(5) == "t-named"

    def boom() -> None:
        raise ValueError("bad text")

    with pytest.raises(ValueError, match="bad text"):
        worker.submit(boom).result(5)
    assert worker.submit(lambda x, y=0: x + y, 2, y=3).result(5) == 5  # still alive after an exception
    worker.shutdown()


def test_a_call_cancelled_while_queued_never_runs() -> None:
    worker = PriorityWorker("t-cancel")
    gate, _ = blocked(worker)
    ran: list[str] = []
    dropped = worker.submit(ran.append, "dropped")
    kept = worker.submit(ran.append, "kept")
    assert dropped.cancel()
    gate.set()
    kept.result(5)
    assert ran == ["kept"]
    with pytest.raises(CancelledError):
        dropped.result(0)
    worker.shutdown()


def test_shutdown_runs_queued_calls_then_refuses_new_ones() -> None:
    worker = PriorityWorker("t-shutdown")
    gate, _ = blocked(worker)
    ran: list[int] = []
    queued = [worker.submit(ran.append, i) for i in range(3)]
    gate.set()
    worker.shutdown(wait=True)
    assert ran == [0, 1, 2] and all(f.done() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        worker.submit(ran.append, 9)
    worker.shutdown()  # twice is harmless


def test_shutdown_can_cancel_what_is_queued() -> None:
    worker = PriorityWorker("t-shutdown-cancel")
    gate, running = blocked(worker)
    ran: list[int] = []
    queued = [worker.submit(ran.append, i) for i in range(3)]
    worker.shutdown(wait=False, cancel_futures=True)
    gate.set()
    running.result(5)
    worker.shutdown(wait=True)
    assert ran == [] and all(f.cancelled() for f in queued)


class GatedExtractor(FakeExtractor):
    """FakeExtractor that records the order of the texts it featurises."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def extract(self, texts: Sequence[str]) -> FeatureBatch:
        self.order.extend(texts)
        return super().extract(texts)


async def test_classifier_input_verdicts_overtake_queued_output_checks() -> None:
    worker = PriorityWorker("t-guard")
    extractor = GatedExtractor()
    moderator = ClassifierModerator(extractor, tiny_head(), worker)
    gate, _ = blocked(worker)
    answer = conv(("user", "fine"), ("assistant", "meh"))
    outputs = [asyncio.create_task(moderator.moderate(answer, Role.AGENT, Stage.OUTPUT)) for _ in range(2)]
    moderate = asyncio.create_task(moderator.moderate(conv(("user", "meh meh")), Role.USER, Stage.MODERATE))
    request = asyncio.create_task(moderator.moderate(conv(("user", "bad")), Role.USER, Stage.INPUT))
    await asyncio.sleep(0.05)  # every call is queued behind the gate
    gate.set()
    verdicts = await asyncio.gather(*outputs, moderate, request)
    assert [v.safe for v in verdicts] == [True, True, True, False]
    assert extractor.order == ["bad", "meh", "meh", "meh meh"]  # input first, the rest in arrival order
    worker.shutdown()


async def test_classifier_cancelled_check_leaves_the_queue() -> None:
    worker = PriorityWorker("t-guard-cancel")
    extractor = GatedExtractor()
    moderator = ClassifierModerator(extractor, tiny_head(), worker)
    gate, _ = blocked(worker)
    gone = asyncio.create_task(moderator.moderate(conv(("assistant", "meh")), Role.AGENT, Stage.OUTPUT))
    await asyncio.sleep(0.05)
    gone.cancel()  # the client went away while its check was queued
    await asyncio.sleep(0)
    gate.set()
    v = await moderator.moderate(conv(("user", "bad")), Role.USER, Stage.INPUT)
    assert not v.safe and extractor.order == ["bad"]
    assert np.isfinite(v.score)
    worker.shutdown()
