"""Held-out known facts: which CounterFact-style facts the unedited model knows.

A fact is *known* when, on its rewrite prompt, the model prefers ``target_true`` over ``target_new``
(lower mean NLL, CounterFact's own criterion) **and** the first token of ``target_true`` ranks among
the ``max_rank`` most likely next tokens (so that a preference between two implausible answers does
not count). Measured on the 312 bundled records: SmolLM2-135M-Instruct knows 118 (prefers the true
target on 210, top-1 on 6), the bundled default model 298. One batched scoring pass decides all
facts; the result depends only on the base model and the facts (cache it by base fingerprint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from editflow.evaluate.scoring import score_ids
from editflow.requests import EditRequest
from editflow.tokens import encode, encode_target, pad_id

#: Default rank bound of the true target's first token.
MAX_RANK = 50


def is_known(nll_true: np.ndarray, nll_new: np.ndarray, rank_true: np.ndarray, max_rank: int = MAX_RANK) -> np.ndarray:
    """The rule of the module docstring, elementwise."""
    return (nll_true < nll_new) & (rank_true < max_rank)


def known_mask(
    model: nn.Module, tokenizer: object, facts: Sequence[EditRequest], *, max_rank: int = MAX_RANK, **batching: Any
) -> list[bool]:
    """Whether the model knows each fact (facts without both targets: False). One scoring pass."""
    usable = [i for i, r in enumerate(facts) if r.target_true and r.target_new]
    pairs = []
    for i in usable:
        prefix = encode(tokenizer, facts[i].text)
        pairs += [
            (prefix, encode_target(tokenizer, facts[i].target_true)),
            (prefix, encode_target(tokenizer, facts[i].target_new)),
        ]
    s = score_ids(model, pairs, pad_id(tokenizer), desc="known facts", **batching)
    known = is_known(s.nll[0::2], s.nll[1::2], s.rank[0::2], max_rank) if usable else np.zeros(0, bool)
    out = [False] * len(facts)
    for i, k in zip(usable, known):
        out[i] = bool(k)
    return out


def select_known(
    model: nn.Module, tokenizer: object, facts: Sequence[EditRequest], *, max_rank: int = MAX_RANK, **batching: Any
) -> list[str]:
    """Texts (rewrite prompts) of the facts the model knows, in order: JSON-friendly, for caching."""
    mask = known_mask(model, tokenizer, facts, max_rank=max_rank, **batching)
    return [r.text for r, k in zip(facts, mask) if k]
