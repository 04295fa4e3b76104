"""onnxruntime-genai driving our exported model folder (`model.onnx` + `genai_config.json`).

N streams are genai's static batch of N (`batch_size` search option): one prefill of all prompts, then one
decode step for all. `min_length` masks EOS until every stream has its `max_new_tokens`, so, like the
llama.cpp driver, exactly the tokens asked for are produced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from importlib.metadata import version

import numpy as np
import onnxruntime_genai as og

from bench.harness import StreamTrace


class GenaiDriver:
    """Greedy generation through `og.Generator`, CPU provider, intra-op threads from the job."""

    def __init__(self, model_dir: str, threads: int, context: int) -> None:
        """Load the folder with the thread count overlaid on its genai_config.json.

        Args:
            model_dir: folder with genai_config.json, model.onnx and tokenizer files.
            threads: onnxruntime intra-op threads of the decoder session.
            context: `max_length` (KV capacity per sequence) of every generator.
        """
        config = og.Config(model_dir)
        config.clear_providers()  # CPU, whatever the folder's config names
        session_options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self._threads = threads
        self._context = context

    def info(self) -> dict[str, object]:
        return {"onnxruntime_genai": version("onnxruntime-genai"), "threads": self._threads}

    def encode(self, text: str) -> list[int]:
        """The folder's tokenizer as genai loads it."""
        return [int(t) for t in self._tokenizer.encode(text)]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[StreamTrace]:
        """Run the prompts as one static batch.

        Args:
            prompts: one id list per stream, all the same length (a static batch needs no padding then).
            max_new_tokens: tokens generated per stream.

        Returns:
            One trace per stream.
        """
        lengths = {len(p) for p in prompts}
        if len(lengths) != 1:
            raise ValueError(f"a static batch needs equal prompt lengths, got {sorted(lengths)}")
        prompt_len = lengths.pop()
        params = og.GeneratorParams(self._model)
        params.set_search_options(
            do_sample=False,
            batch_size=len(prompts),
            max_length=self._context,
            min_length=prompt_len + max_new_tokens,
        )
        generator = og.Generator(self._model, params)  # allocates the KV buffers: outside the timed span
        ids = np.asarray(prompts, dtype=np.int32)  # (batch, prompt_len)
        start = time.perf_counter()
        traces = [StreamTrace(start=start) for _ in prompts]
        generator.append_tokens(ids)  # the prefill forward
        for _ in range(max_new_tokens):
            generator.generate_next_token()  # samples; from the 2nd call on, runs one decode forward first
            now = time.perf_counter()
            for trace, token in zip(traces, generator.get_next_tokens(), strict=True):
                trace.add(int(token), now)
        del generator
        return traces
