"""The engine: one thread owns the onnxruntime session and the KV cache; requests come and go between steps.

Callers (the asyncio servicer, the guard, benchmarks) `submit` a GenerationRequest and iterate a
`RequestHandle` (async or blocking) for TokenEvents; `cancel` frees the slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.engine.kv_cache import KVCache
from service.engine.model_spec import ModelSpec, load_model_spec
from service.engine.sampler import validate_sampling
from service.engine.scheduler import Scheduler
from service.engine.session import DecoderSession, SessionOptions
from service.engine.types import FinishReason, GenerationRequest, TokenEvent
from service.errors import PromptTooLong, QueueFull, Unavailable
from service.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_slots: int = 8  # sequences decoded together; bounds KV memory
    max_queue: int = 64  # waiting requests beyond the slots; more are rejected at once
    intra_op_threads: int = 0  # 0 = the cores this process may use
    max_context: int = 0  # 0 = the model's own context length
    prefill_chunk: int = 256  # prompt tokens per step, so a long prefill can't stall running streams
    graph_optimization: str = "all"
    profile_prefix: str | None = None
    prefix_cache_slots: int = 0  # slots pinned for recurring prompt prefixes (the guard engine uses 2)
    force_copying_kv: bool = False  # use the copying KV path even where sharing works (tests, debugging)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for metrics; all counters are totals since start."""

    running: int
    waiting: int
    slots: int
    kv_bytes_used: int
    kv_bytes_reserved: int
    steps: int
    prompt_tokens: int
    generation_tokens: int

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_bytes_used / max(1, self.kv_bytes_reserved)


class RequestHandle:
    """The caller's side of one request: iterate events (async or blocking), or cancel."""

    def __init__(self, engine: Engine, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request = req
        self._engine = engine
        self._loop = loop
        self._aq: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if loop is not None else None
        self._q: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.done = False
        self.cancelled = False

    def cancel(self) -> None:
        """Asks the engine to stop this request; its slot is freed at the next step. Idempotent."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._engine._cancel(self)

    def _deliver(self, events: list[TokenEvent]) -> None:
        """Called from the engine thread with this step's events, in order."""
        if self._aq is not None and self._loop is not None:
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._put_all, events)
        else:
            for ev in events:
                self._q.put(ev)

    def _put_all(self, events: list[TokenEvent]) -> None:
        assert self._aq is not None
        for ev in events:
            self._aq.put_nowait(ev)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        if self._aq is None:
            raise RuntimeError("submit() was called outside an event loop; use iter_blocking()")
        try:
            while True:
                ev = await self._aq.get()
                yield ev
                if ev.finish_reason is not None:
                    self.done = True
                    return
        finally:
            if not self.done:  # the consumer went away (client cancel): free the slot
                self.cancel()

    def iter_blocking(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._q.get()
            yield ev
            if ev.finish_reason is not None:
                self.done = True
                return


class Engine:
    """Loads a model folder and runs continuous batching on a dedicated thread."""

    def __init__(self, spec: ModelSpec, session: DecoderSession, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.spec = spec
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.max_context = min(config.max_context or spec.context_length, spec.context_length)
        self.kv = KVCache(session.kv_layout(config.max_slots, self.max_context))
        self.eos_ids = spec.eos_ids | tokenizer.eos_ids
        self.scheduler = Scheduler(session, self.kv, tokenizer, self.eos_ids, config.prefill_chunk, self.max_context,
                                   config.prefix_cache_slots)
        self._cv = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._cancels: list[RequestHandle] = []
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, model_dir: Path, config: EngineConfig | None = None) -> Engine:
        config = config or EngineConfig()
        spec = load_model_spec(model_dir)
        session = DecoderSession(spec.onnx_path, SessionOptions(config.intra_op_threads, config.graph_optimization,
                                                                config.profile_prefix))
        # Graphs that cannot share past and present run the copying, row-at-a-time fallback.
        session.shared_kv = spec.shared_kv_buffer and not config.force_copying_kv
        if not session.shared_kv:
            log.warning("%s: past and present KV cannot share a buffer; using the slower copying path", model_dir)
        return cls(spec, session, Tokenizer.from_dir(model_dir), config)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sluice-engine", daemon=True)
            self._thread.start()

    def warmup(self) -> None:
        """One short generation through the whole path (allocations, kernels' first-run costs)."""
        ids = tuple(self.tokenizer.encode_plain("Hello")) or (0,)
        h = self.submit(GenerationRequest(request_id="warmup", prompt_ids=ids, max_new_tokens=2), loop=None)
        for _ in h.iter_blocking():
            pass

    def stop_accepting(self) -> None:
        """Drain: new submits get Unavailable; running requests continue."""
        self._accepting = False

    def stop(self) -> None:
        """Ends the thread; requests still running end with CANCELLED."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- requests ---------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | bool | None = True) -> RequestHandle:
        """Queues a request. Raises QueueFull, PromptTooLong, Unavailable, or ValueError for bad sampling.

        Args:
            req: the request.
            loop: the asyncio loop to deliver events on; True (default) = the running loop if any.
        """
        if not self._accepting or self._stopping:
            raise Unavailable("server is shutting down")
        if not req.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(req.prompt_ids) >= self.max_context:
            raise PromptTooLong(len(req.prompt_ids), self.max_context)
        validate_sampling(req.sampling, req.prompt_ids, self.tokenizer.vocab_size)
        if loop is True:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        handle = RequestHandle(self, req, loop if isinstance(loop, asyncio.AbstractEventLoop) else None)
        with self._cv:
            # Requests beyond the free slots wait in the bounded queue; a full queue rejects at once.
            if not self._has_room_locked():
                raise QueueFull()
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def has_room(self) -> bool:
        """False when a submit now would raise QueueFull: every slot busy and every queue place taken.

        Lets a caller refuse work before spending anything on it (tokenizing, the input guard); `submit`
        still decides, since capacity can change between the two calls.

        Returns:
            Whether one more request would be admitted or queued.
        """
        with self._cv:
            return self._has_room_locked()

    def _has_room_locked(self) -> bool:
        return len(self._waiting) - self.kv.free_slots < self.config.max_queue

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            self._cancels.append(handle)
            self._cv.notify()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(running=len(s.running), waiting=len(self._waiting), slots=self.config.max_slots,
                           kv_bytes_used=self.kv.nbytes_used(), kv_bytes_reserved=self.kv.nbytes_reserved(),
                           steps=s.steps, prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens)

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        s = self.scheduler
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancels or s.running):
                    self._cv.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
                waiting_cancelled = [h for h in cancels if h in self._waiting]
                for h in waiting_cancelled:
                    self._waiting.remove(h)
                now = time.monotonic()
                expired = [h for h in self._waiting if h.request.deadline is not None and now >= h.request.deadline]
                for h in expired:
                    self._waiting.remove(h)
                admitted: list[RequestHandle] = []
                while self._waiting and self.kv.free_slots > len(admitted):
                    admitted.append(self._waiting.popleft())
            for h in waiting_cancelled:
                h._deliver([TokenEvent(token_id=None, text="", finish_reason=FinishReason.CANCELLED)])
            for h in expired:  # expired while waiting for a slot: no engine work was done
                h._deliver([TokenEvent(token_id=None, text="", finish_reason=FinishReason.DEADLINE)])
            try:
                s.step(admitted, [h for h in cancels if h not in waiting_cancelled], time.monotonic())
            except Exception:  # a bug in the step itself: fail what is running, keep the thread alive
                log.exception("engine step failed")
                s.fail_all()
        with self._cv:
            leftovers = list(self._waiting)
            self._waiting.clear()
        for h in leftovers:
            h._deliver([TokenEvent(token_id=None, text="", finish_reason=FinishReason.CANCELLED)])
        s.cancel_all()
