"""Golden reference of shielded serving: the fixed-point executor decoding one prompt alone (the
protected vLLM server equals it token for token, test_shielded_serving.py), and the validation
prompts of the TINY reference model."""

from __future__ import annotations

import torch

from secure_service.shielded_executor import ShieldedExecutor
from slip_vllm.evaluation import reference_model as rm


def offline_greedy(executor: ShieldedExecutor, prompt: list[int], new_tokens: int) -> list[int]:
    """One sequence alone through the fixed-point executor (blocks 0, 1, ... in order)."""
    bs = executor.cache.block_size
    tokens, out = list(prompt), []
    n = len(prompt)
    table = torch.arange(-(-(n + new_tokens) // bs))[None]
    logits = executor.step(torch.tensor(tokens), torch.arange(n), torch.arange(n), torch.tensor([0, n]),
                           torch.tensor([n]), table)
    for _ in range(new_tokens):
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        pos = len(tokens)
        tokens.append(nxt)
        logits = executor.step(torch.tensor([nxt]), torch.tensor([pos]), torch.tensor([pos]), torch.tensor([0, 1]),
                               torch.tensor([pos + 1]), table)
    return out


def validation_prompts(count: int, length: int) -> list[list[int]]:
    data = rm.load_reference_data(rm.get_reference_model(config=rm.TINY, progress=False))
    ids = data.val_ids
    step = (len(ids) - length) // count
    return [ids[i * step:i * step + length].tolist() for i in range(count)]
