"""One thread for the guard's blocking calls, running the checks a request's start waits on first.

The classifier's encoder runs on a single dedicated thread (`service/guard_factory.py` says why), so under
load its calls queue. They are not equal: an input verdict holds a whole request before its first token,
while an output check holds only the release of a window whose tokens the engine keeps generating meanwhile.
`PriorityWorker` runs queued calls lowest priority value first, in submission order within a priority, and
skips calls cancelled while queued (a client that went away costs no encoder time).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")

# Priorities used by the guard (lower runs first); `submit` uses DEFAULT_PRIORITY.
URGENT = 0
DEFAULT_PRIORITY = 1
BACKGROUND = 2
_LAST = 2**62  # the shutdown sentinel: after every queued call


@dataclass(slots=True)
class _Call:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class PriorityWorker(Executor):
    """A one-thread `Executor` with per-call priorities.

    Args:
        name: the thread's name (shows in profilers and thread dumps).
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, _Call | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Queue `fn(*args, **kwargs)` at DEFAULT_PRIORITY (the `Executor` interface)."""
        return self.submit_at(DEFAULT_PRIORITY, fn, *args, **kwargs)

    def submit_at(self, priority: int, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Queue `fn(*args, **kwargs)`; it runs before every queued call of a higher priority value.

        Args:
            priority: lower runs first (URGENT, DEFAULT_PRIORITY).
            fn: the blocking call.

        Returns:
            Its future; cancelling it while queued removes the call.

        Raises:
            RuntimeError: after `shutdown`.
        """
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((priority, next(self._order), _Call(future, fn, args, kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; the thread ends once the queued ones ran (or were cancelled).

        Args:
            wait: block until the thread has ended.
            cancel_futures: cancel the calls still queued instead of running them.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    self._cancel_queued()
                self._queue.put((_LAST, next(self._order), None))
        if wait:
            self._thread.join()

    def _cancel_queued(self) -> None:
        while True:
            try:
                _, _, call = self._queue.get_nowait()
            except queue.Empty:
                return
            if call is not None:
                call.future.cancel()

    def _run(self) -> None:
        while True:
            _, _, call = self._queue.get()
            if call is None:
                return
            if not call.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = call.fn(*call.args, **call.kwargs)
            except BaseException as e:  # handed to the caller through the future, like ThreadPoolExecutor
                call.future.set_exception(e)
            else:
                call.future.set_result(result)
