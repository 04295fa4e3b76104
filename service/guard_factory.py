"""Builds the configured moderation backend (a composition helper for service/app.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from guard.backends.classifier import ClassifierModerator, load_head
from guard.backends.llama_guard import LlamaGuardModerator
from guard.cascade import CascadeModerator
from guard.encoder import MiniLMEncoder
from guard.moderator import Moderator
from guard.policy import Policy
from service.config import Config, GuardBackend
from service.engine.engine import Engine, EngineConfig
from service.guard_lm import EngineGuardLM

# Guard checks are short prompts; a few slots let input and output checks of concurrent requests batch.
GUARD_SLOTS = 4
# One pinned prefix per (policy, role) in use: User and Agent for the deployment policy.
GUARD_PREFIX_SLOTS = 2


@dataclass
class BuiltGuard:
    moderator: Moderator | None
    engines: list[Engine] = field(default_factory=list)  # extra engines to start/stop with the server


def build_guard(config: Config, policy: Policy) -> BuiltGuard:
    """The moderator for `config.guard.backend` (not yet wrapped in FailSafeModerator)."""
    backend = config.guard.backend
    if backend is GuardBackend.NONE:
        return BuiltGuard(None)
    if backend is GuardBackend.CLASSIFIER:
        return BuiltGuard(build_classifier(config))
    guard_engine = _guard_engine(config)
    llama_guard = LlamaGuardModerator(EngineGuardLM(guard_engine), policy)
    if backend is GuardBackend.LLAMA_GUARD:
        return BuiltGuard(llama_guard, [guard_engine])
    cascade = CascadeModerator(build_classifier(config), llama_guard, config.guard.cascade_low,
                               config.guard.cascade_high)
    return BuiltGuard(cascade, [guard_engine])


def _guard_engine(config: Config) -> Engine:
    if config.guard.model is None:  # config validation also rejects this
        raise ValueError(f"guard.model is required for guard.backend {config.guard.backend.value}")
    engine = Engine.load(config.guard.model, EngineConfig(
        max_slots=GUARD_SLOTS, max_queue=config.engine.max_queue, intra_op_threads=config.engine.intra_op_threads,
        prefill_chunk=config.engine.prefill_chunk, prefix_cache_slots=GUARD_PREFIX_SLOTS))
    engine.start()
    return engine


def build_classifier(config: Config) -> Moderator:
    """The embedded classifier: MiniLM sentence features + the shipped head, thresholds from the policy."""
    g = config.guard
    encoder = MiniLMEncoder(g.encoder, threads=g.encoder_threads)
    return ClassifierModerator(encoder, load_head(g.head), input_threshold=g.input_threshold,
                               output_threshold=g.output_threshold)

