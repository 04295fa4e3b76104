"""Builds the configured moderation backend (a composition helper for service/app.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guard.backends.classifier import ClassifierModerator, load_head
from guard.backends.llama_guard import LlamaGuardModerator
from guard.cascade import CascadeModerator
from guard.encoder import MiniLMEncoder
from guard.moderator import Moderator
from guard.policy import (
    DEFAULT_FIRST_RELEASE_WINDOW_TOKENS,
    DEFAULT_OUTPUT_CONTEXT_CHARS,
    DEFAULT_RELEASE_WINDOW_TOKENS,
    Policy,
)
from guard.split import RoleSplitModerator
from guard.worker import PriorityWorker
from service.config import Config, GuardBackend
from service.engine.engine import Engine, EngineConfig
from service.guard_lm import EngineGuardLM

# Guard checks are short prompts; a few slots let input and output checks of concurrent requests batch.
GUARD_SLOTS = 4
# One pinned prefix per (policy, role) in use: User and Agent for the deployment policy.
GUARD_PREFIX_SLOTS = 2

log = logging.getLogger(__name__)
# the output schedule a head's per-stream threshold is chosen for (tools/guard_stream_threshold.py)
STREAM_SCHEDULE = (DEFAULT_FIRST_RELEASE_WINDOW_TOKENS, DEFAULT_RELEASE_WINDOW_TOKENS, DEFAULT_OUTPUT_CONTEXT_CHARS)


def stream_schedule_warning(stream_offset: float, first: int, window: int, context_chars: int) -> str | None:
    """A warning when a head with a per-stream output threshold serves another output schedule, else None.

    The threshold is chosen so that a stream under the default schedule stops no more safe answers than one
    whole judgment flags; more checks a stream (a smaller window) stop more, fewer checks fewer.
    """
    if not stream_offset or (first, window, context_chars) == STREAM_SCHEDULE:
        return None
    want_first, want_window, want_chars = STREAM_SCHEDULE
    return (f"the guard head's per-stream output threshold was chosen for checks after {want_first} tokens doubling "
            f"to {want_window}, reading {want_chars} characters; this server checks after {first} doubling to "
            f"{window}, reading {context_chars}, so its streams are checked more or less often than the threshold "
            f"assumes (docs/GUARD.md, \"Per-stream output threshold\"; guard.output_threshold adjusts it)")


@dataclass
class BuiltGuard:
    moderator: Moderator | None
    stops: list[Callable[[], None]] = field(default_factory=list)  # run when the server stops (guard engines...)


def build_guard(config: Config, policy: Policy) -> BuiltGuard:
    """The moderator for `config.guard.backend` (not yet wrapped in FailSafeModerator)."""
    backend = config.guard.backend
    if backend is GuardBackend.NONE:
        return BuiltGuard(None)
    if backend is GuardBackend.CLASSIFIER:
        classifier, worker = build_classifier(config)
        return BuiltGuard(classifier, [worker.shutdown])
    guard_engine = _guard_engine(config)
    llama_guard = LlamaGuardModerator(EngineGuardLM(guard_engine), policy)
    if backend is GuardBackend.LLAMA_GUARD:
        return BuiltGuard(llama_guard, [guard_engine.stop])
    classifier, worker = build_classifier(config)
    cascade = CascadeModerator(classifier, llama_guard, config.guard.cascade_low, config.guard.cascade_high)
    return BuiltGuard(cascade, [guard_engine.stop, worker.shutdown])


def _guard_engine(config: Config) -> Engine:
    if config.guard.model is None:  # config validation also rejects this
        raise ValueError(f"guard.model is required for guard.backend {config.guard.backend.value}")
    engine = Engine.load(config.guard.model, EngineConfig(
        max_slots=GUARD_SLOTS, max_queue=config.engine.max_queue, intra_op_threads=config.engine.intra_op_threads,
        prefill_chunk=config.engine.prefill_chunk, prefix_cache_slots=GUARD_PREFIX_SLOTS))
    engine.start()
    return engine


def build_classifier(config: Config) -> tuple[Moderator, PriorityWorker]:
    """The embedded classifier (MiniLM sentence features + the shipped head, thresholds from the policy) and
    the one worker thread its encoder runs on.

    One worker, not the loop's shared pool: concurrent checks queue for it instead of each running the encoder
    at once, and every extra encoder thread takes a core from the generator's intra-op threads. Measured with
    8 concurrent streams (`bench.guard_overhead --concurrency 8`, 2026-11-29, 2 cores): per-token latency
    1.09-1.19x unguarded (median 1.12x, seven runs) against 1.10-1.24x (median 1.17x, six runs) on the shared
    pool, for input verdicts a few ms later under that load (median 17 vs 15 ms); no difference with 4 streams.
    The worker runs input verdicts before queued output checks (`guard.worker`, `STAGE_PRIORITY`).
    With `guard.output_head` set, a second head on its own encoder judges Agent turns (`RoleSplitModerator`);
    both encoders run on the one worker, and a check runs one of them.
    """
    g = config.guard
    output_encoder, output_head = g.output_encoder, g.output_head  # config validation: both or neither
    worker = PriorityWorker("guard-encoder")
    try:
        if output_encoder is None or output_head is None:
            return _classifier(config, g.encoder, g.head, worker, judges_output=True), worker
        user_side = _classifier(config, g.encoder, g.head, worker, judges_output=False)
        agent_side = _classifier(config, output_encoder, output_head, worker, judges_output=True)
        return RoleSplitModerator(user_side, agent_side), worker
    except BaseException:  # a head on the wrong encoder, a missing folder: no worker thread left behind
        worker.shutdown()
        raise


def _classifier(config: Config, encoder_dir: Path, head_file: Path, worker: PriorityWorker, *,
                judges_output: bool) -> ClassifierModerator:
    """One head on its encoder; `judges_output`: its per-stream output threshold matters (warn on a schedule
    it was not chosen for)."""
    g = config.guard
    head = load_head(head_file)
    if judges_output and (warning := stream_schedule_warning(
            head.stream_offset, g.first_release_window_tokens, g.release_window_tokens, g.output_context_chars)):
        log.warning(warning)
    return ClassifierModerator(MiniLMEncoder(encoder_dir, threads=g.encoder_threads), head, worker,
                               input_threshold=g.input_threshold, output_threshold=g.output_threshold)

