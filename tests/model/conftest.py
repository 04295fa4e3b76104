"""Engine fixtures shared by tests/model/test_engine*.py: one 8-slot engine, a plain onnxruntime loop.

The engine is session-scoped (loading it and warming it up is most of a second on a busy machine) and is
stopped at the end of the session. Tests that use it must leave it idle: `idle_engine` checks that before
and after each test, so a test that leaks a running request fails instead of skewing the next one.

`PlainLM` is the independent path the engine is checked against: plain `session.run` with numpy feeds
and past tensors that grow by one position per step (no IOBinding, no shared buffer, no slots).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from guard.backends.classifier import ClassifierModerator, load_head
from guard.encoder import MiniLMEncoder
from guard.moderator import Message
from service.engine.engine import Engine, EngineConfig
from service.engine.types import FinishReason, GenerationRequest, TokenEvent
from service.text.chat import ChatTemplate

MAX_SLOTS = 8
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ROOT = Path(__file__).resolve().parents[2]

# The embedded guard as shipped (`make encoder` builds every encoder folder): the default and the previous default
# (kept for rollback, GUARD_PROFILE=previous), each an int8 encoder with its own adapter merged in, the head trained
# on that encoder's features, the adapter.
GUARD_ENCODER_DIR = ROOT / "models" / "minilm-l6-v2-guard"
HEAD_PATH = ROOT / "guard" / "heads" / "minilm-l6-v2.npz"
ADAPTER_PATH = ROOT / "guard" / "heads" / "minilm-l6-v2-lora.npz"
PREVIOUS_ENCODER_DIR = ROOT / "models" / "minilm-l6-v2-guard-previous"
PREVIOUS_HEAD_PATH = ROOT / "guard" / "heads" / "previous" / "minilm-l6-v2.npz"
PREVIOUS_ADAPTER_PATH = ROOT / "guard" / "heads" / "previous" / "minilm-l6-v2-lora.npz"
GUARD_PROFILES = {"default": (GUARD_ENCODER_DIR, HEAD_PATH, ADAPTER_PATH),
                  "previous": (PREVIOUS_ENCODER_DIR, PREVIOUS_HEAD_PATH, PREVIOUS_ADAPTER_PATH)}
# The opt-in Agent-turn head (GUARD_PROFILE=split, guard.output_head): it judges answers only, so tests of
# User-turn verdicts leave it out; `ANSWER_HEADS` is every shipped head that judges answers in some profile.
OUTPUT_ENCODER_DIR = ROOT / "models" / "minilm-l6-v2-guard-output"
OUTPUT_HEAD_PATH = ROOT / "guard" / "heads" / "output" / "minilm-l6-v2.npz"
OUTPUT_ADAPTER_PATH = ROOT / "guard" / "heads" / "output" / "minilm-l6-v2-lora.npz"
ANSWER_HEADS = {**GUARD_PROFILES, "output": (OUTPUT_ENCODER_DIR, OUTPUT_HEAD_PATH, OUTPUT_ADAPTER_PATH)}


def open_encoder(folder: Path) -> MiniLMEncoder:
    """An encoder folder built by `make encoder`; a missing one fails the test with the command to run."""
    if not (folder / "model.onnx").exists():
        pytest.fail(f"{folder} is missing: run `make encoder`")
    return MiniLMEncoder(folder, threads=1)


def profile_moderator(profile: str) -> ClassifierModerator:
    """The classifier of an `ANSWER_HEADS` entry (every `GUARD_PROFILES` one too): its head on its own encoder."""
    encoder_dir, head, _ = ANSWER_HEADS[profile]
    return ClassifierModerator(open_encoder(encoder_dir), load_head(head))


class PlainLM:
    """Greedy decoding and logits with plain `InferenceSession.run`: numpy in, numpy out."""

    def __init__(self, model_dir: Path) -> None:
        so = ort.SessionOptions()
        # The engine's default thread count (the cores we may use), so both run the same kernels.
        so.intra_op_num_threads = len(os.sched_getaffinity(0))
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        # (batch, kv_heads, past_len, head_dim): heads and head size are static in the graph.
        _, self.kv_heads, _, self.head_dim = inputs[self.past_names[0]].shape
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _empty_past(self) -> dict[str, np.ndarray]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)  # (1, kv_heads, 0, head_dim)
        return dict.fromkeys(self.past_names, empty)

    def _run(self, ids: Sequence[int], past: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict[str, Any]]:
        feeds = {
            "input_ids": np.asarray([ids], np.int64),  # (1, seq)
            "attention_mask": np.ones((1, past_len + len(ids)), np.int64),  # (1, total)
            **past,
        }
        out = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        new_past = {n: out["present." + n.removeprefix("past_key_values.")] for n in self.past_names}
        return out["logits"][0, -1], new_past  # (vocab,)

    def greedy(self, prompt: Sequence[int], max_new: int, eos_ids: frozenset[int]) -> list[int]:
        """Greedy continuation: the prompt in one run, then one token per run; stops after an EOS id."""
        logits, past = self._run(prompt, self._empty_past(), 0)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos_ids or len(out) == max_new:
                return out
            logits, past = self._run([token], past, len(prompt) + len(out) - 1)

    def last_logits(self, ids: Sequence[int]) -> np.ndarray:
        """(vocab,) logits of the next token after `ids` (one run over the whole sequence)."""
        return self._run(ids, self._empty_past(), 0)[0]


def collect(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    """Runs one request to its end through the blocking iterator."""
    return list(engine.submit(req, loop=None).iter_blocking())


def token_ids(events: Sequence[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


@pytest.fixture(scope="session")
def greedy_cases() -> list[dict[str, Any]]:
    """The three chat prompts of the outside fp32 reference (see its "source" field)."""
    cases: list[dict[str, Any]] = json.loads((FIXTURES / "greedy_fp32.json").read_text())["cases"]
    return cases


@pytest.fixture(scope="session")
def shared_engine(model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(model_dir, EngineConfig(max_slots=MAX_SLOTS, max_queue=64, prefill_chunk=256))
    engine.start()
    engine.warmup()
    yield engine
    engine.stop()


def _assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert (stats.running, stats.waiting, engine.kv.free_slots) == (0, 0, MAX_SLOTS)


@pytest.fixture
def engine(shared_engine: Engine) -> Iterator[Engine]:
    """The shared engine, idle before and after the test (so 'alone' really means alone)."""
    _assert_idle(shared_engine)
    yield shared_engine
    _assert_idle(shared_engine)


@pytest.fixture(scope="session")
def plain_lm(model_dir: Path) -> PlainLM:
    return PlainLM(model_dir)


@pytest.fixture(scope="session")
def chat_template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_tokenizer_config(json.loads((model_dir / "tokenizer_config.json").read_text()))


@pytest.fixture(scope="session")
def chat_ids(shared_engine: Engine, chat_template: ChatTemplate) -> Callable[[str], tuple[int, ...]]:
    """User text -> prompt ids through the model's own template (content untrusted)."""

    def render(user: str) -> tuple[int, ...]:
        segments = chat_template.render_segments([Message("user", user)])
        return tuple(shared_engine.tokenizer.encode_segments(segments))

    return render


class AloneRuns:
    """Greedy runs of one prompt alone on the shared engine, memoised across tests.

    A longer earlier run answers a shorter question: greedy is a prefix-closed function of the prompt.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._memo: dict[tuple[tuple[int, ...], int], list[TokenEvent]] = {}  # (prompt, max_new) -> events

    def events(self, prompt: Sequence[int], max_new: int) -> list[TokenEvent]:
        """The events of a run with this `max_new_tokens`."""
        key = (tuple(prompt), max_new)
        if key not in self._memo:
            _assert_idle(self._engine)
            self._memo[key] = collect(self._engine, GenerationRequest("alone", key[0], max_new_tokens=max_new))
        return self._memo[key]

    def tokens(self, prompt: Sequence[int], max_new: int) -> list[int]:
        """The first `max_new` greedy tokens (fewer if the run ended with EOS), from any run that has them."""
        for (p, n), events in self._memo.items():
            if p == tuple(prompt) and (n >= max_new or events[-1].finish_reason is FinishReason.EOS):
                return token_ids(events)[:max_new]
        return token_ids(self.events(prompt, max_new))


@pytest.fixture(scope="session")
def alone_runs(shared_engine: Engine) -> AloneRuns:
    return AloneRuns(shared_engine)


@pytest.fixture(scope="session")
def greedy_alone(alone_runs: AloneRuns) -> Callable[[Sequence[int], int], list[int]]:
    """prompt, n -> the first n greedy tokens of the prompt run alone (fewer if it ended with EOS)."""
    return alone_runs.tokens
