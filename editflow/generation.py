"""Decoding: the one implementation of greedy decoding and top-k sampling in editflow.

:func:`decode` runs micro-batches of prompts left-padded (explicit position ids, so padding never
shifts positions) through the model with its KV cache, one token for every row per step, the LM head
only at the last position. Greedy picks the argmax; top-k samples from the ``top_k`` most likely
tokens with a private seeded generator, one draw for the whole batch per step (so a draw depends on
the batch's composition: prompts are batched in input order, ``batch_rows`` at a time).
Used by :func:`complete` (serving), the pre-edit answers and the fluency sampling of
:mod:`editflow.evaluate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from editflow import nethook, progress
from editflow.tokens import encode, model_positions, pad_id, pad_right


def model_max_length(model: nn.Module, default: int = 1024) -> int:
    """Longest sequence the model accepts (:func:`editflow.tokens.model_positions`, else ``default``)."""
    return model_positions(model) or default


def pad_batch(
    seqs: Sequence[Sequence[int]], pad: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, offsets) of ``seqs`` padded on ``side``; ``offsets[i]`` = column of row i's first token.

    Left padding is right padding (:func:`editflow.tokens.pad_right`) of the reversed rows, flipped.
    """
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    if side == "right":
        b = pad_right(seqs, pad)
        return b.input_ids, b.attention_mask, torch.zeros(len(seqs), dtype=torch.long)
    b = pad_right([list(s)[::-1] for s in seqs], pad)
    return b.input_ids.flip(1), b.attention_mask.flip(1), b.input_ids.shape[1] - b.lengths


def _forward_kwargs(model: nn.Module) -> dict[str, object]:
    """``logits_to_keep=1`` when the model supports it (LM head at the last position only)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def next_token(logits: torch.Tensor, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """(rows, 1) next tokens from (rows, vocab) float logits: argmax, or a top-k sample."""
    if top_k is None:
        return logits.argmax(-1, keepdim=True)
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
    return top.indices.gather(1, pick)


@torch.no_grad()
def _decode_batch(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    pad: int,
    steps: int,
    top_k: int | None,
    generator: torch.Generator | None,
    bar: object,
) -> list[list[int]]:
    """``steps`` new tokens for each of ``rows`` (one left-padded batch, KV cache)."""
    device = next(model.parameters()).device
    ids, mask, _ = pad_batch(rows, pad, "left")
    ids, mask = ids.to(device), mask.to(device)
    extra, cache_arg = _forward_kwargs(model), nethook.cache_kwarg(model)
    past, cur, new = None, ids, []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1] :]  # (rows, cur_len)
        res = model(input_ids=cur, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg: past}, **extra)
        past = getattr(res, cache_arg, None)
        past = res.past_key_values if past is None else past
        cur = next_token(res.logits[:, -1].float(), top_k, generator)  # (rows, 1)
        new.append(cur)
        mask = torch.cat([mask, torch.ones_like(cur)], 1)
        bar.update(len(rows))  # type: ignore[attr-defined]
    return torch.cat(new, 1).tolist() if new else [[] for _ in rows]


def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    pad: int,
    new_tokens: int,
    *,
    top_k: int | None = None,
    seed: int = 0,
    batch_rows: int = 32,
    desc: str = "decode",
) -> list[list[int]]:
    """New token ids after each prompt: greedy (``top_k`` None) or seeded top-k sampling.

    Batches of ``batch_rows`` prompts in input order; a batch gets min(``new_tokens``, context − its
    widest prompt) tokens (EOS does not stop). Prompts are used as given (cut them to the context).
    """
    device = next(model.parameters()).device
    generator = None if top_k is None else torch.Generator(device=device).manual_seed(seed)
    limit, rows = model_max_length(model), max(1, int(batch_rows))
    out: list[list[int]] = []
    with progress.bar(total=len(prompts) * new_tokens, desc=desc, unit="tok") as bar:
        for start in range(0, len(prompts), rows):
            part = prompts[start : start + rows]
            steps = max(0, min(new_tokens, limit - max(map(len, part))))
            out += _decode_batch(model, part, pad, steps, top_k, generator, bar)
    return out


def truncate_at(ids: Sequence[int], stop: int | None) -> list[int]:
    """``ids`` up to (without) the first ``stop`` token."""
    ids = list(ids)
    return ids[: ids.index(stop)] if stop is not None and stop in ids else ids


def complete(
    model: nn.Module, tokenizer: object, prompts: Sequence[str], max_new_tokens: int = 8, batch_rows: int = 32
) -> list[str]:
    """The greedy continuation of each prompt (without the prompt), up to the first EOS."""
    limit = model_max_length(model)
    ids = [encode(tokenizer, p)[-max(1, limit - max_new_tokens) :] for p in prompts]
    new = decode(model, ids, pad_id(tokenizer), max_new_tokens, batch_rows=batch_rows, desc="complete")
    eos = getattr(tokenizer, "eos_token_id", None)
    return [tokenizer.decode(truncate_at(n, eos), skip_special_tokens=True) for n in new]  # type: ignore[attr-defined]
