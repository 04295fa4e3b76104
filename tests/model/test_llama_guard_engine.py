"""The llama_guard backend's mechanics on our own engine, with the embedded model standing in for
Llama-Guard-3-1B (its judgments are meaningless here; the plumbing is what is tested):

- the score is P(first answer token = "unsafe") from the full-vocabulary softmax, equal to what an
  independent plain onnxruntime forward over the same prompt ids gives;
- the fixed policy prefix is prefilled once: a second check prefills only the conversation + suffix;
- the answer parser is strict: the stand-in's free text is a backend error, and FailSafeModerator turns
  it into a fail-closed verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from guard.backends.llama_guard import UNSAFE_TOKEN, LlamaGuardModerator
from guard.failsafe import FailSafeModerator
from guard.moderator import Message, Role, Stage
from guard.policy import Policy
from guard.prompt import build_guard_prompt
from service.engine.engine import Engine, EngineConfig
from service.guard_lm import EngineGuardLM
from tests.model.conftest import PlainLM

CONVERSATION = (Message("user", "How do I bake sourdough bread at home?"),)


@pytest.fixture(scope="module")
def guard_engine(model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(model_dir, EngineConfig(max_slots=3, prefix_cache_slots=2))
    engine.start()
    yield engine
    engine.stop()


async def test_score_is_first_token_probability_and_prefix_is_reused(guard_engine: Engine,
                                                                       model_dir: Path) -> None:
    lm = EngineGuardLM(guard_engine)
    policy = Policy()
    prompt = build_guard_prompt(CONVERSATION, Role.USER, policy.categories)
    tok = guard_engine.tokenizer
    prefix_ids = tok.encode_trusted(prompt.prefix)
    rest_ids = tok.encode_plain(prompt.conversation) + tok.encode_trusted(prompt.suffix)

    before = guard_engine.stats().prompt_tokens
    first = await lm.score(prompt.prefix, prompt.conversation, prompt.suffix, unsafe_token=UNSAFE_TOKEN,
                           max_new_tokens=4)
    after_first = guard_engine.stats().prompt_tokens
    second = await lm.score(prompt.prefix, prompt.conversation, prompt.suffix, unsafe_token=UNSAFE_TOKEN,
                            max_new_tokens=4)
    after_second = guard_engine.stats().prompt_tokens

    assert after_first - before == len(prefix_ids) + len(rest_ids)  # the first check prefills everything
    assert after_second - after_first == len(rest_ids)  # the second reuses the policy prefix's KV
    assert guard_engine.scheduler.prefixes.hits >= 1
    assert second.text == first.text

    # Independent reference: plain onnxruntime over the same ids, softmax over the whole vocabulary.
    logits = PlainLM(model_dir).last_logits([*prefix_ids, *rest_ids]).astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    expected = float(probs[tok.encode_plain(UNSAFE_TOKEN)[0]])
    assert math.isclose(first.unsafe_prob, expected, rel_tol=1e-3, abs_tol=1e-9)
    assert math.isclose(second.unsafe_prob, first.unsafe_prob, rel_tol=1e-4, abs_tol=1e-12)


async def test_unparseable_answer_fails_closed(guard_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    policy = Policy(timeout_seconds=60.0)  # a parse failure, not a timeout on a busy machine, is under test
    moderator = FailSafeModerator(LlamaGuardModerator(EngineGuardLM(guard_engine), policy), policy)
    verdict = await moderator.moderate(CONVERSATION, Role.USER, Stage.INPUT)
    # SmolLM2 does not answer "safe" / "unsafe\nS1": the strict parser rejects it -> error verdict, blocked.
    assert verdict.error and not verdict.safe
    assert "VerdictParseError" in caplog.text  # the strict parser, not a timeout, decided
    assert guard_engine.stats().running == 0  # the check ran to its end; nothing left behind
