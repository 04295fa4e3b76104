"""llama.cpp (llama-cpp-python's low-level ctypes API) on the GGUF file itself.

Parallel sequences use one `llama_batch` holding tokens of several sequence ids, so N streams advance in
one `llama_decode` per step, which is how llama.cpp's own server batches. Greedy argmax in numpy; EOS is
ignored so every stream produces exactly the tokens asked for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import llama_cpp as lc
import numpy as np

from bench.harness import StreamTrace

# llama.cpp's default physical batch; prompts up to this many tokens are one matmul pass.
UBATCH = 512


class LlamaCppDriver:
    """Greedy generation with llama.cpp; one context per stream count, reused across runs."""

    def __init__(self, gguf: str, threads: int, context: int) -> None:
        """Load the model.

        Args:
            gguf: the GGUF file.
            threads: n_threads and n_threads_batch.
            context: KV capacity per sequence (the context holds n_seq times this).
        """
        lc.llama_backend_init()
        self._model = lc.llama_model_load_from_file(gguf.encode(), lc.llama_model_default_params())
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self._n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._threads = threads
        self._context = context
        self._ctx: Any = None
        self._batch: Any = None
        self._n_seq = 0

    def info(self) -> dict[str, object]:
        return {"llama_cpp_python": version("llama-cpp-python"), "threads": self._threads}

    def encode(self, text: str) -> list[int]:
        """The GGUF tokenizer: no BOS, special-token text stays text."""
        data = text.encode()
        buf = (lc.llama_token * (len(data) + 8))()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError("llama_tokenize failed")
        return list(buf[:n])

    def _prepare(self, n_seq: int) -> None:
        """A context sized for `n_seq` sequences with an empty KV cache (built outside the timed span)."""
        if self._ctx is not None and self._n_seq == n_seq:
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
            return
        self.close()
        params = lc.llama_context_default_params()
        params.n_ctx = n_seq * self._context
        params.n_batch = params.n_ctx  # a whole multi-stream prefill goes in one llama_decode call
        params.n_ubatch = UBATCH
        params.n_seq_max = n_seq
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise RuntimeError("llama_init_from_model failed")
        self._batch = lc.llama_batch_init(params.n_ctx, 0, 1)
        self._n_seq = n_seq

    def _fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Write (token, position, sequence id, want logits) rows into the batch."""
        batch = self._batch
        for k, (token, pos, seq, want) in enumerate(entries):
            batch.token[k] = token
            batch.pos[k] = pos
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = 1 if want else 0
        batch.n_tokens = len(entries)

    def _decode_argmax(self, n_out: int, first_row: Sequence[int]) -> list[int]:
        """Run the batch, then the argmax at each output row."""
        if lc.llama_decode(self._ctx, self._batch) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")
        out = []
        for i in range(n_out):
            ptr = lc.llama_get_logits_ith(self._ctx, first_row[i])
            out.append(int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)))))
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[StreamTrace]:
        """Prefill all prompts in one batch, then decode all streams together, one token each per step.

        Args:
            prompts: one id list per stream.
            max_new_tokens: tokens generated per stream (EOS ignored).

        Returns:
            One trace per stream.
        """
        n = len(prompts)
        self._prepare(n)
        entries = [(tok, pos, s, pos == len(ids) - 1) for s, ids in enumerate(prompts) for pos, tok in enumerate(ids)]
        last_rows = list(np.cumsum([len(p) for p in prompts]) - 1)
        start = time.perf_counter()
        traces = [StreamTrace(start=start) for _ in prompts]
        self._fill(entries)
        tokens = self._decode_argmax(n, last_rows)
        _stamp(traces, tokens)
        positions = [len(p) for p in prompts]
        for _ in range(max_new_tokens - 1):
            self._fill([(tokens[s], positions[s], s, True) for s in range(n)])
            tokens = self._decode_argmax(n, range(n))
            positions = [p + 1 for p in positions]
            _stamp(traces, tokens)
        return traces

    def close(self) -> None:
        """Free the context and batch (the model stays loaded)."""
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None


def _stamp(traces: Sequence[StreamTrace], tokens: Sequence[int]) -> None:
    """Every stream of a static batch gets its token at the same instant."""
    now = time.perf_counter()
    for trace, token in zip(traces, tokens, strict=True):
        trace.add(token, now)
