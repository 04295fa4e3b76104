"""Composition root: the one place that builds objects from the Config and wires them together.

`python -m service serve` -> service/cli.py -> `run(config)` here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from guard.backends.classifier import load_metadata
from guard.failsafe import FailSafeModerator
from guard.moderator import Moderator
from guard.policy import Policy
from guard.taxonomy import BUILTIN_CODES, sort_codes
from service import __version__
from service._pb.sluice.v1 import generation_pb2
from service.config import Config, GuardBackend
from service.engine.engine import Engine, EngineConfig
from service.grpc_metrics import CallInterceptor, CallObserver, RecordingSink
from service.guard_factory import build_guard
from service.logs import RequestLogger
from service.pipeline import Pipeline, PromptRenderer
from service.server import SluiceServer, install_signal_handlers, start_server
from service.servicer import GenerationServicer, Lifecycle, ModerationServicer, ServingInfo
from service.stats import StatsSink
from service.text.chat import ChatTemplate
from service.validation import limits_from_config

log = logging.getLogger(__name__)


@dataclass
class App:
    config: Config
    engine: Engine
    pipeline: Pipeline
    generation: GenerationServicer
    moderation: ModerationServicer
    life: Lifecycle
    guard_stops: list[Callable[[], None]]  # the guard's own engines and encoder worker, stopped with the server


def engine_config(config: Config) -> EngineConfig:
    e = config.engine
    return EngineConfig(max_slots=e.max_slots, max_queue=e.max_queue, intra_op_threads=e.intra_op_threads,
                        max_context=e.max_context, prefill_chunk=e.prefill_chunk)


def policy_from_config(config: Config) -> Policy:
    g = config.guard
    return Policy(enabled=BUILTIN_CODES, excluded=tuple(g.excluded_categories), input_threshold=g.input_threshold,
                  output_threshold=g.output_threshold, fail_open=g.fail_open,
                  release_window_tokens=g.release_window_tokens,
                  first_release_window_tokens=g.first_release_window_tokens,
                  output_context_chars=g.output_context_chars, output_prefilter_chars=g.output_prefilter_chars,
                  output_prefilter_below=g.output_prefilter_below, output_confirm_score=g.output_confirm_score,
                  timeout_seconds=g.timeout_seconds)


def classifier_identity(config: Config) -> dict[str, str]:
    """GuardInfo's classifier_head and classifier_features (and the Agent-turn head's, when one is set) when the
    embedded classifier judges, else nothing."""
    g = config.guard
    if g.backend not in (GuardBackend.CLASSIFIER, GuardBackend.CASCADE):
        return {}
    identity = {"classifier_head": str(g.head), "classifier_features": str(load_metadata(g.head).get("features", ""))}
    if g.output_head is not None:
        identity.update(classifier_output_head=str(g.output_head),
                        classifier_output_features=str(load_metadata(g.output_head).get("features", "")))
    return identity


def chat_template(tokenizer_config: dict[str, object]) -> ChatTemplate | None:
    return ChatTemplate.from_tokenizer_config(tokenizer_config) if tokenizer_config.get("chat_template") else None


def build_app(config: Config, engine: Engine, stats: StatsSink | None = None,
              moderator: Moderator | None = None) -> App:
    """Wires a loaded engine into servicers. `moderator` overrides the configured backend (tests)."""
    policy = policy_from_config(config)
    guard_stops: list[Callable[[], None]] = []
    if moderator is None and config.guard.backend is not GuardBackend.NONE:
        built = build_guard(config, policy)
        moderator, guard_stops = built.moderator, built.stops
    if moderator is not None:
        moderator = FailSafeModerator(moderator, policy)
    model_dir = engine.spec.path
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    add_bos = bool(tokenizer_config.get("add_bos_token", False))
    template = chat_template(tokenizer_config)
    renderer = PromptRenderer(engine.tokenizer, template, add_bos)
    pipeline = Pipeline(engine, renderer, moderator, policy, stats)
    limits = limits_from_config(config, policy.known_codes)
    guard_info = generation_pb2.GuardInfo(
        backend=config.guard.backend.value, enabled_categories=sort_codes(policy.active_codes),
        categories=sort_codes(policy.known_codes), input_threshold=policy.input_threshold,
        output_threshold=policy.output_threshold, release_window_tokens=policy.release_window_tokens,
        first_release_window_tokens=policy.first_window_tokens,
        fail_open=policy.fail_open, **classifier_identity(config))
    info = ServingInfo(model_name=engine.spec.path.name, precision=engine.spec.precision,
                       context_length=engine.max_context, vocab_size=engine.tokenizer.vocab_size,
                       has_chat_template=template is not None, guard=guard_info, server_version=__version__)
    life = Lifecycle()
    return App(config, engine, pipeline, GenerationServicer(pipeline, limits, info, life),
               ModerationServicer(pipeline, limits, life), life, guard_stops)


async def start(config: Config, stats: StatsSink | None = None,
                moderator: Moderator | None = None) -> tuple[App, SluiceServer]:
    """Starts the gRPC server (NOT_SERVING), loads and warms the model, then flips health to SERVING."""
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, Engine.load, config.engine.model, engine_config(config))
    engine.start()
    # The pipeline reports through RecordingSink, so each call's end carries its RequestRecord (grpc_metrics).
    app = build_app(config, engine, RecordingSink(stats), moderator)
    attach_engine = getattr(stats, "attach_engine", None)  # metrics.PrometheusSink: engine gauges at scrape time
    if callable(attach_engine):
        attach_engine(engine)
    observers: list[CallObserver] = [RequestLogger(config.log.text)]
    if isinstance(stats, CallObserver):
        observers.append(stats)
    token = config.security.auth_token.reveal() if config.security.auth_token else None
    server = await start_server(config, app.generation, app.moderation, app.life, token,
                                extra_interceptors=[CallInterceptor(observers)])
    await loop.run_in_executor(None, engine.warmup)
    server.on_drain.append(engine.stop_accepting)
    server.on_stop.append(engine.stop)
    server.on_stop.extend(app.guard_stops)
    await server.set_serving(True)
    log.info("serving %s (%s) on port %d", engine.spec.name, engine.spec.precision, server.port)
    return app, server


async def serve(config: Config) -> int:
    from service.metrics import start_metrics  # metrics are optional; imported where used

    stop = asyncio.Event()
    install_signal_handlers(stop)
    sink = start_metrics(config)
    _app, server = await start(config, stats=sink)
    await stop.wait()
    await server.drain()
    return 0


def run(config: Config) -> int:
    from service.logs import setup_logging

    setup_logging(config.log)
    return asyncio.run(serve(config))
