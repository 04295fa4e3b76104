"""`llama_guard` backend: a Llama Guard 3 model, run by an injected engine, as a `Moderator`.

The score is Meta's recipe: the probability that the first generated token is "unsafe" (softmax over
the whole vocabulary at the first answer position), compared with the policy's threshold. The
categories come from the strictly parsed second line of the greedy answer. A score over the threshold
with an answer of "safe" blocks without categories; an answer that does not parse is a backend error
(the policy then fails open or closed).

Pointing it at Llama-Guard-3-1B: convert the model folder with the project's GGUF tool (or use an
official ONNX export), run a second engine instance over it, and pass an adapter implementing `GuardLM`
with a policy whose `enabled` is `LLAMA_GUARD_3_1B_CODES` (the 1B model was trained on S1-S13).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from guard.moderator import Message, Role, Stage, Verdict
from guard.policy import Policy
from guard.prompt import build_guard_prompt, parse_verdict

BACKEND_NAME = "llama_guard"
UNSAFE_TOKEN = "unsafe"
# "unsafe\nS1,S2,...,S14" is about 45 Llama 3 tokens in the worst case; a normal answer stops at EOS
# after 2-6 tokens, so this bound only matters when a stand-in model rambles.
MAX_VERDICT_TOKENS = 64


@dataclass(frozen=True, slots=True)
class GuardLMOutput:
    """What the engine returns for one guard prompt.

    Args:
        unsafe_prob: softmax probability, over the full vocabulary at the first answer position, of the
            first token of `unsafe_token` as the tokenizer encodes it (one token in Llama 3's vocabulary).
        text: the greedy answer decoded without special tokens, stopped at EOS / <|eot_id|> or after
            `max_new_tokens`.
    """

    unsafe_prob: float
    text: str


class GuardLM(Protocol):
    """The engine side of the `llama_guard` backend (implemented outside `guard/`).

    Tokenization contract, which keeps hostile content inert and makes the prefix reusable:

    - `prefix` and `suffix` are template text: encode them with special-token matching on
      ("<|begin_of_text|>", "<|eot_id|>", ... become their ids) and without adding a BOS (the prefix
      already holds it).
    - `conversation` is untrusted: encode it as plain text, with special-token matching off (e.g.
      `tokenizers.Tokenizer.encode_special_tokens = True` while encoding it).
    - ids = ids(prefix) + ids(conversation) + ids(suffix); the parts split where Llama 3's
      pre-tokenizer splits, so this equals tokenizing the whole prompt.
    - `prefix` is identical for every check with the same policy and role: prefill it once, keep its
      KV cache keyed by the prefix string (a few entries: User / Agent per policy in use), and per call
      prefill only `conversation + suffix` on top of a copy or a read-only view of it.
    """

    async def score(
        self, prefix: str, conversation: str, suffix: str, *, unsafe_token: str, max_new_tokens: int
    ) -> GuardLMOutput:
        """Run the guard prompt: first-token probability of `unsafe_token`, and the greedy answer.

        Args:
            prefix: template text before the turns (cacheable).
            conversation: the rendered turns (untrusted, plain text).
            suffix: template text after the turns, ending with the assistant header.
            unsafe_token: the answer word whose first-token probability is the score.
            max_new_tokens: bound on the greedy answer.

        Returns:
            The probability and the answer text.
        """
        ...


class LlamaGuardModerator:
    """`Moderator` over a Llama Guard 3 model.

    Args:
        lm: the engine adapter.
        policy: categories listed in the prompt, thresholds, codes the answer may name.
        clock: seconds, for the verdict's latency.
    """

    name = BACKEND_NAME

    def __init__(self, lm: GuardLM, policy: Policy, clock: Callable[[], float] = time.perf_counter) -> None:
        self._lm = lm
        self._policy = policy
        self._clock = clock

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._policy

    def with_policy(self, policy: Policy) -> LlamaGuardModerator:
        """The same model under another policy (e.g. one tightened for a request).

        Args:
            policy: the policy to apply.

        Returns:
            A moderator sharing this one's engine adapter.
        """
        return LlamaGuardModerator(self._lm, policy, self._clock)

    async def moderate(self, conversation: Sequence[Message], role: Role, stage: Stage) -> Verdict:
        """Judge the last message of `role`.

        Args:
            conversation: the turns, oldest first; the last one belongs to `role`.
            role: Role.USER or Role.AGENT.
            stage: input / output / moderate.

        Returns:
            The verdict. Raises ConversationError for an unjudgeable conversation, VerdictParseError
            for a malformed answer, ValueError for a score outside [0, 1], and whatever the engine raises.
        """
        start = self._clock()
        prompt = build_guard_prompt(conversation, role, self._policy.categories)
        out = await self._lm.score(
            prompt.prefix,
            prompt.conversation,
            prompt.suffix,
            unsafe_token=UNSAFE_TOKEN,
            max_new_tokens=MAX_VERDICT_TOKENS,
        )
        _, codes = parse_verdict(out.text, self._policy.known_codes)
        return self._policy.decide(
            role,
            out.unsafe_prob,
            codes,
            backend=BACKEND_NAME,
            stage=stage,
            latency=self._clock() - start,
        )
