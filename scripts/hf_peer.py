"""The Hugging Face transformers peer of `scripts.bench_serving --peer hf`: the same weights (written with
`model.hf.save_hf`, read back with `AutoModelForCausalLM.from_pretrained`, float32 on the CPU) serving the same
requests with `generate` in static batches: up to `batch_size` requests in arrival order, left-padded to the
longest prompt, greedy, each batch running until its longest output is done. EOS is disabled so that every request
runs to its own length, as in the engine's run (`max_new_tokens` of a batch = its longest output; a request's own
output is the first `max_new_tokens` of its row, and only those are counted as useful tokens).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PeerResult:
    """Each request's output tokens (its own length), and the seconds of the timed run."""

    token_ids: list[list[int]]
    seconds: float
    load_s: float
    batches: int
    padded_tokens: int  # tokens generated, useful or not (rows run to their batch's longest output)


class HFPeer:
    """`model` (a meshlm Transformer) as a transformers model on the CPU, in float32."""

    def __init__(self, model, *, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from model.hf import save_hf

        if threads:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            save_hf(model, folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()
        gen = self.model.generation_config
        gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, 0
        gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
        self.load_s = time.perf_counter() - start
        self.torch = torch

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy outputs of `max_new_tokens` tokens for each prompt, batched with left padding."""
        torch = self.torch
        longest = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, longest - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return out[:, longest:].tolist()

    def serve(self, prompts: Sequence[Sequence[int]], outputs: Sequence[int], batch_size: int) -> PeerResult:
        """Serve every request (prompt, output length) in static batches of `batch_size`, in order."""
        tokens: list[list[int]] = []
        padded = 0
        start = time.perf_counter()
        for first in range(0, len(prompts), batch_size):
            batch = range(first, min(first + batch_size, len(prompts)))
            steps = max(outputs[i] for i in batch)
            rows = self.generate_batch([prompts[i] for i in batch], steps)
            tokens += [row[:outputs[i]] for i, row in zip(batch, rows, strict=True)]
            padded += steps * len(batch)
        return PeerResult(tokens, time.perf_counter() - start, self.load_s,
                          -(-len(prompts) // batch_size), padded)
