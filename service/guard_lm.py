"""`GuardLM` over our own engine: a Llama Guard 3 model folder served by a second Engine instance.

The guard prompt's fixed policy prefix is marked cacheable (`GenerationRequest.cache_prefix_len`): the
engine keeps its KV in a pinned slot after the first check and copies it into each new check's slot,
so a check only prefills the conversation and the closing instructions. The score is the probability
of the first answer token being "unsafe", from the full-vocabulary softmax at the first position
(`score_token_ids`), as in Meta's recipe.
"""

from __future__ import annotations

import itertools
import math

from guard.backends.llama_guard import GuardLMOutput
from service.engine.engine import Engine
from service.engine.types import GenerationRequest, SamplingParams

_ids = itertools.count()


class EngineGuardLM:
    """Implements guard.backends.llama_guard.GuardLM with an Engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

    async def score(self, prefix: str, conversation: str, suffix: str, *, unsafe_token: str,
                    max_new_tokens: int) -> GuardLMOutput:
        """See GuardLM.score: template parts with special tokens, the conversation as plain text."""
        tok = self.tokenizer
        head = tok.encode_trusted(prefix)
        ids = [*head, *tok.encode_plain(conversation), *tok.encode_trusted(suffix)]
        unsafe_ids = tok.encode_plain(unsafe_token)
        if not unsafe_ids:
            raise ValueError("unsafe token encodes to nothing")
        req = GenerationRequest(
            request_id=f"guard-{next(_ids)}", prompt_ids=tuple(ids), sampling=SamplingParams(),
            max_new_tokens=max_new_tokens, cache_prefix_len=len(head), score_token_ids=(unsafe_ids[0],))
        handle = self.engine.submit(req)
        generated: list[int] = []
        prob = 0.0
        async for ev in handle:
            if ev.scored:
                prob = math.exp(ev.scored[0].logprob)
            if ev.token_id is not None:
                generated.append(ev.token_id)
        text = tok.decode([t for t in generated if t not in self.engine.eos_ids], skip_special_tokens=True)
        return GuardLMOutput(unsafe_prob=prob, text=text)
