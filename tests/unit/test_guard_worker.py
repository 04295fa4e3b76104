"""The guard's one-thread priority worker, and the classifier putting input verdicts first on it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import replace

import numpy as np
import pytest

from guard.backends.classifier import ClassifierModerator, slice_end
from guard.features import FeatureBatch
from guard.moderator import Role, Stage
from guard.worker import DEFAULT_PRIORITY, URGENT, PriorityWorker
from tests.unit.test_classifier import FakeExtractor, conv, sig, tiny_head


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


def blocked_classifier(name: str) -> tuple[PriorityWorker, GatedExtractor, ClassifierModerator, threading.Event]:
    """A classifier on its own worker, with the worker occupied until the returned event is set."""
    worker = PriorityWorker(name)
    extractor = GatedExtractor()
    gate, _ = blocked(worker)
    return worker, extractor, ClassifierModerator(extractor, tiny_head(), worker), gate


async def test_classifier_input_verdicts_overtake_queued_output_checks() -> None:
    worker, extractor, moderator, gate = blocked_classifier("t-guard")
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


async def test_classifier_moderate_calls_wait_for_queued_checks_of_running_streams() -> None:
    worker, extractor, moderator, gate = blocked_classifier("t-guard-moderate")
    moderate = [asyncio.create_task(moderator.moderate(conv(("user", "meh meh")), Role.USER, Stage.MODERATE))
                for _ in range(3)]
    await asyncio.sleep(0.05)
    output = asyncio.create_task(moderator.moderate(conv(("assistant", "fine")), Role.AGENT, Stage.OUTPUT))
    await asyncio.sleep(0.05)  # all queued: three Moderate calls first, then a stream's output check
    gate.set()
    await asyncio.gather(*moderate, output)
    assert extractor.order == ["fine", "meh meh", "meh meh", "meh meh"]
    worker.shutdown()


async def test_classifier_cancelled_check_leaves_the_queue() -> None:
    worker, extractor, moderator, gate = blocked_classifier("t-guard-cancel")
    gone = asyncio.create_task(moderator.moderate(conv(("assistant", "meh")), Role.AGENT, Stage.OUTPUT))
    await asyncio.sleep(0.05)
    gone.cancel()  # the client went away while its check was queued
    await asyncio.sleep(0)
    gate.set()
    v = await moderator.moderate(conv(("user", "bad")), Role.USER, Stage.INPUT)
    assert not v.safe and extractor.order == ["bad"]
    assert np.isfinite(v.score)
    worker.shutdown()


class WindowedFake(FakeExtractor):
    """FakeExtractor as a `WindowedExtractor`: each word is one 300-token window (so a slice holds one),
    whose vector is the word's; records the words it encodes, and can hold the encoder on a word."""

    def __init__(self, hold_on: str | None = None) -> None:
        super().__init__()
        self.order: list[str] = []
        self.words: list[str] = []
        self.hold_on = hold_on
        self.holding, self.release = threading.Event(), threading.Event()

    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        windows, owners = [], []
        for i, text in enumerate(texts):
            for word in text.split():
                self.words.append(word)
                windows.append([len(self.words) - 1] * 300)
                owners.append(i)
        return windows, owners

    def encode_windows(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        rows = []
        for w in windows:
            word = self.words[w[0]]
            self.order.append(word)
            if word == self.hold_on and not self.holding.is_set():
                self.holding.set()
                self.release.wait(5)
            rows.append(self.VECTORS[word])
        return np.asarray(rows, dtype=np.float32)


async def wait_for_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 5)


async def test_a_long_text_is_encoded_in_slices_that_let_queued_checks_run_between() -> None:
    worker = PriorityWorker("t-slices")
    extractor = WindowedFake(hold_on="fine")
    moderator = ClassifierModerator(extractor, tiny_head(), worker)
    long = asyncio.create_task(moderator.moderate(conv(("user", "fine meh meh bad")), Role.USER, Stage.MODERATE))
    await wait_for_event(extractor.holding)  # the long text's first slice holds the encoder
    check = asyncio.create_task(moderator.moderate(conv(("assistant", "meh")), Role.AGENT, Stage.OUTPUT))
    await asyncio.sleep(0.05)
    extractor.release.set()
    verdict, checked = await asyncio.gather(long, check)
    # the check queued during the first slice ran before the long text's second slice
    assert extractor.order == ["fine", "meh", "meh", "meh", "bad"]
    assert not verdict.safe and verdict.score == pytest.approx(sig(1), rel=1e-6)  # its worst window decides
    assert checked.safe
    direct = ClassifierModerator(FakeExtractor(), tiny_head())  # unsliced: the same verdict
    unsliced = await direct.moderate(conv(("user", "fine meh meh bad")), Role.USER, Stage.MODERATE)
    assert replace(unsliced, latency=0.0) == replace(verdict, latency=0.0)
    worker.shutdown()


async def test_a_timed_out_long_text_stops_after_its_current_slice() -> None:
    worker = PriorityWorker("t-slices-timeout")
    extractor = WindowedFake(hold_on="fine")
    moderator = ClassifierModerator(extractor, tiny_head(), worker)
    long = asyncio.create_task(moderator.moderate(conv(("user", "fine meh meh meh")), Role.USER, Stage.MODERATE))
    await wait_for_event(extractor.holding)
    long.cancel()  # e.g. FailSafeModerator's timeout
    await asyncio.sleep(0)
    extractor.release.set()
    with pytest.raises(asyncio.CancelledError):
        await long
    worker.submit(lambda: None).result(5)  # whatever was queued has run
    assert extractor.order == ["fine"]  # no slice after the one running when it was cancelled
    worker.shutdown()


def test_slices_hold_as_many_windows_as_fit_the_token_budget_and_at_least_one() -> None:
    windows = [[0] * 256, [0] * 100, [0] * 150, [0] * 600, [0] * 10]
    assert slice_end(windows, 0, 512) == 3  # 256 + 100 + 150
    assert slice_end(windows, 3, 512) == 4  # one window over the budget still makes a slice
    assert slice_end(windows, 4, 512) == 5
    assert slice_end(windows, 0, 1) == 1


async def test_only_the_first_slice_of_a_long_input_verdict_is_urgent() -> None:
    worker = PriorityWorker("t-slices-urgent")
    extractor = WindowedFake(hold_on="fine")
    moderator = ClassifierModerator(extractor, tiny_head(), worker)
    long_input = asyncio.create_task(moderator.moderate(conv(("user", "fine meh meh")), Role.USER, Stage.INPUT))
    await wait_for_event(extractor.holding)
    checks = [asyncio.create_task(moderator.moderate(conv(("assistant", "bad")), Role.AGENT, Stage.OUTPUT))
              for _ in range(2)]
    await asyncio.sleep(0.05)
    extractor.release.set()
    await asyncio.gather(long_input, *checks)
    # both output checks were queued before its second slice: they run first, it does not jump them
    assert extractor.order == ["fine", "bad", "bad", "meh", "meh"]
    worker.shutdown()
