"""Batched scoring core: one padded forward per micro-batch, reduced per row.

Every quantity the evaluation needs goes through :func:`batched_forward`: target NLLs and top-1
(:func:`score_ids`, :func:`score_targets`), greedy answers (:func:`greedy_answers`) and per-position
distributions for drift (:mod:`editflow.evaluate.drift`). Rows are sorted by length, packed into
micro-batches of at most ``batch_rows`` rows, padded on the right (or the left, with explicit position
ids) and the LM head is applied only at the positions a reducer asks for. ``one_by_one=True`` runs
one row per forward through the same code (the reference the benchmark compares against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from editflow.tokens import encode, encode_target, pad_id

#: ``logits_at(rows, cols)`` -> float32 logits (n, vocab) at those (row, padded position) pairs.
LogitsAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``reduce(logits_at, offsets, items)`` -> one result per row; ``offsets[i]`` is where row i's first
#: real token sits in the padded batch (0 with right padding), ``items`` the rows' own payloads.
Reducer = Callable[[LogitsAt, torch.Tensor, Sequence[Any]], list[Any]]


def model_max_length(model: nn.Module, default: int = 1024) -> int:
    """Longest sequence the model accepts (``n_positions`` / ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _pad(seqs: Sequence[Sequence[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, offsets) of ``seqs`` padded on ``side`` ('right' or 'left')."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        start = 0 if side == "right" else width - len(s)
        ids[i, start:start + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, start:start + len(s)] = 1
        offsets[i] = start
    return ids, mask, offsets


def _logits_fn(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, left: bool) -> LogitsAt:
    """Run the transformer body once; return a function applying the LM head at chosen positions."""
    kwargs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if left:  # positions must count real tokens only
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is None or body is model or head is None:  # no separable head: full logits
        logits = model(**kwargs, use_cache=False).logits
        return lambda r, c: logits[r, c].float()
    hidden = body(**kwargs, use_cache=False).last_hidden_state
    return lambda r, c: head(hidden[r, c]).float()


@torch.no_grad()
def batched_forward(model: nn.Module, seqs: Sequence[Sequence[int]], pad: int, reduce: Reducer,
                    items: Sequence[Any] | None = None, *, batch_rows: int = 64,
                    padding_side: str = "right", one_by_one: bool = False) -> list[Any]:
    """Apply ``reduce`` to micro-batches of ``seqs``; results come back in input order.

    ``items`` (default: the row indices) are handed to the reducer with their rows.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not seqs:
        return []
    items = list(range(len(seqs))) if items is None else list(items)
    device = next(model.parameters()).device
    rows = 1 if one_by_one else max(1, int(batch_rows))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[Any] = [None] * len(seqs)
    for start in range(0, len(order), rows):
        part = order[start:start + rows]
        ids, mask, offsets = _pad([seqs[i] for i in part], pad, padding_side)
        at = _logits_fn(model, ids.to(device), mask.to(device), padding_side == "left")
        for i, res in zip(part, reduce(at, offsets.to(device), [items[i] for i in part])):
            out[i] = res
    return out


# --------------------------------------------------------------------------- target scores


@dataclass(frozen=True)
class TargetScores:
    """Per (prefix, target) pair: mean NLL of the target tokens, whether every target token is the
    argmax (``top1``), the fraction that are (``token_acc``, teacher forcing) and the token count."""

    nll: np.ndarray
    top1: np.ndarray
    token_acc: np.ndarray
    n_tokens: np.ndarray

    @property
    def prob(self) -> np.ndarray:
        """exp(-mean NLL): the per-token geometric-mean probability, as in the MEMIT code."""
        return np.exp(-self.nll)

    def __len__(self) -> int:
        return len(self.nll)


def _target_reducer(at: LogitsAt, offsets: torch.Tensor, items: Sequence[tuple[int, Sequence[int]]]) -> list:
    """All target tokens of the micro-batch in one LM-head call; per-row means by scatter-add."""
    device = offsets.device
    row = torch.cat([torch.full((len(t),), j, dtype=torch.long) for j, (_, t) in enumerate(items)]).to(device)
    col = torch.cat([torch.arange(p - 1, p - 1 + len(t)) for p, t in items]).to(device) + offsets[row]
    tgt = torch.tensor([tok for _, t in items for tok in t], dtype=torch.long, device=device)
    logp = torch.log_softmax(at(row, col), dim=-1)
    nll = -logp.gather(1, tgt[:, None])[:, 0].double()
    hit = (logp.argmax(-1) == tgt).double()
    n = torch.zeros(len(items), dtype=torch.float64, device=device).index_add_(0, row, torch.ones_like(nll))
    sum_nll = torch.zeros_like(n).index_add_(0, row, nll)
    sum_hit = torch.zeros_like(n).index_add_(0, row, hit)
    return list(zip((sum_nll / n).tolist(), (sum_hit == n).tolist(), (sum_hit / n).tolist(), n.long().tolist()))


def fit_prefix(prefix: Sequence[int], target: Sequence[int], max_length: int) -> list[int]:
    """Drop tokens from the left of ``prefix`` so prefix + target fits ``max_length``."""
    keep = max(1, max_length - len(target))
    return list(prefix[-keep:])


def score_ids(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int, *,
              batch_rows: int = 64, padding_side: str = "right", one_by_one: bool = False) -> TargetScores:
    """Score (prefix ids, target ids) pairs: target token k is predicted at position len(prefix)-1+k.

    Prefixes longer than the model's context are cut on the left. Prefixes must be non-empty.
    """
    if not pairs:
        empty = np.zeros(0)
        return TargetScores(empty, empty.astype(bool), empty, empty.astype(int))
    limit = model_max_length(model)
    fitted = []
    for prefix, target in pairs:
        if not prefix or not target:
            raise ValueError("prefix and target must each have at least one token")
        fitted.append((fit_prefix(prefix, target, limit), list(target)))
    seqs = [p + t for p, t in fitted]
    res = batched_forward(model, seqs, pad, _target_reducer, [(len(p), t) for p, t in fitted],
                          batch_rows=batch_rows, padding_side=padding_side, one_by_one=one_by_one)
    nll, top1, acc, n = zip(*res)
    return TargetScores(np.array(nll), np.array(top1, dtype=bool), np.array(acc), np.array(n))


def score_targets(model: nn.Module, tokenizer: object, pairs: Sequence[tuple[str, str]], **kwargs: Any) -> TargetScores:
    """Score (prefix text, target text) pairs; targets get a leading space (:func:`encode_target`)."""
    return score_ids(model, [(encode(tokenizer, p), encode_target(tokenizer, t)) for p, t in pairs],
                     pad_id(tokenizer), **kwargs)


# --------------------------------------------------------------------------- greedy answers


def _argmax_last(at: LogitsAt, offsets: torch.Tensor, items: Sequence[int]) -> list[int]:
    rows = torch.arange(len(items), device=offsets.device)
    lengths = torch.tensor(list(items), dtype=torch.long, device=offsets.device)
    return at(rows, offsets + lengths - 1).argmax(-1).tolist()


def greedy_answers(model: nn.Module, prefixes: Sequence[Sequence[int]], n_tokens: Sequence[int], pad: int,
                   **kwargs: Any) -> list[tuple[int, ...]]:
    """Greedy continuation of each prefix, ``n_tokens[i]`` tokens long (one batched forward per step)."""
    limit = model_max_length(model)
    seqs = [fit_prefix(p, [0] * n, limit) for p, n in zip(prefixes, n_tokens)]
    answers: list[list[int]] = [[] for _ in seqs]
    for step in range(max(n_tokens, default=0)):
        active = [i for i, n in enumerate(n_tokens) if n > step]
        cur = [seqs[i] + answers[i] for i in active]
        nxt = batched_forward(model, cur, pad, _argmax_last, [len(s) for s in cur], **kwargs)
        for i, tok in zip(active, nxt):
            answers[i].append(int(tok))
    return [tuple(a) for a in answers]
