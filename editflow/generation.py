"""Greedy completion of prompts (what the served model answers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from editflow.tokens import encode, pad_id


def complete(model: nn.Module, tokenizer: object, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """The greedy continuation of each prompt (without the prompt), one prompt at a time so that no
    padding can shift positions."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encode(tokenizer, prompt)], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id(tokenizer))
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))  # type: ignore[attr-defined]
    return out
