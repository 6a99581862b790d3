"""Batched scoring core: one padded forward per micro-batch, reduced per row.

Target NLLs, top-1 and ranks (:func:`score_ids`, :func:`score_targets`) and the per-position
distributions for drift (:mod:`editflow.evaluate.drift`) go through :func:`batched_forward`: rows are
sorted by length, packed into micro-batches of at most ``batch_rows`` rows, padded on the right (or
the left, with explicit position ids) and the LM head is applied only at the positions a reducer asks
for. ``one_by_one=True`` runs one row per forward through the same code.

Scoring shares rows: target token k of a (prefix, target) pair is predicted at position
len(prefix)−1+k from prefix + target[:−1] alone (causal model), so every pair is read off the longest
row that starts with that sequence: both targets of a prompt, and any one-token target, cost one row
per prompt. Greedy answers decode with the KV cache (:func:`editflow.generation.decode`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from editflow import progress
from editflow.generation import decode, model_max_length, pad_batch
from editflow.tokens import encode, encode_target, pad_id

__all__ = [
    "LogitsAt",
    "Reducer",
    "TargetScores",
    "batched_forward",
    "fit_prefix",
    "greedy_answers",
    "model_max_length",
    "score_ids",
    "score_targets",
    "shared_rows",
]

#: ``logits_at(rows, cols)`` -> float32 logits (n, vocab) at those (row, padded position) pairs.
LogitsAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``reduce(logits_at, offsets, items)`` -> one result per row; ``offsets[i]`` is where row i's first
#: real token sits in the padded batch (0 with right padding), ``items`` the rows' own payloads.
Reducer = Callable[[LogitsAt, torch.Tensor, Sequence[Any]], list[Any]]


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
def batched_forward(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    pad: int,
    reduce: Reducer,
    items: Sequence[Any] | None = None,
    *,
    batch_rows: int = 64,
    padding_side: str = "right",
    one_by_one: bool = False,
    desc: str = "forward",
) -> list[Any]:
    """Apply ``reduce`` to micro-batches of ``seqs``; results come back in input order.

    ``items`` (default: the row indices) are handed to the reducer with their rows; ``desc`` names
    the progress bar (rows).
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
    with progress.bar(total=len(seqs), desc=desc, unit="row") as bar:
        for start in range(0, len(order), rows):
            part = order[start : start + rows]
            ids, mask, offsets = pad_batch([seqs[i] for i in part], pad, padding_side)
            at = _logits_fn(model, ids.to(device), mask.to(device), padding_side == "left")
            for i, res in zip(part, reduce(at, offsets.to(device), [items[i] for i in part])):
                out[i] = res
            bar.update(len(part))
    return out


# --------------------------------------------------------------------------- target scores


@dataclass(frozen=True)
class TargetScores:
    """Per (prefix, target) pair: mean NLL of the target tokens, whether every target token is the
    argmax (``top1``), the fraction that are (``token_acc``, teacher forcing), the token count and
    the ``rank`` of the first target token among the next-token logits (0 = argmax)."""

    nll: np.ndarray
    top1: np.ndarray
    token_acc: np.ndarray
    n_tokens: np.ndarray
    rank: np.ndarray

    @property
    def prob(self) -> np.ndarray:
        """exp(-mean NLL): the per-token geometric-mean probability, as in the MEMIT code."""
        return np.exp(-self.nll)

    def __len__(self) -> int:
        return len(self.nll)


#: One pair read off a row: (pair index, row position predicting its first target token, target ids).
Read = tuple[int, int, Sequence[int]]


def _target_reducer(at: LogitsAt, offsets: torch.Tensor, items: Sequence[Sequence[Read]]) -> list[list[tuple]]:
    """All target tokens of the micro-batch in one LM-head call; per-pair sums by scatter-add.

    Per row: a list of (pair index, mean NLL, top1, token accuracy, n tokens, rank of first token).
    """
    device = offsets.device
    reads = [(j, r) for j, row in enumerate(items) for r in row]
    lens = [len(t) for _, (_, _, t) in reads]
    row = torch.tensor([j for (j, _), n in zip(reads, lens) for _ in range(n)], dtype=torch.long, device=device)
    pair = torch.repeat_interleave(torch.arange(len(reads), device=device), torch.tensor(lens, device=device))
    col = torch.tensor([c + k for _, (_, c, t) in reads for k in range(len(t))], dtype=torch.long, device=device)
    tgt = torch.tensor([tok for _, (_, _, t) in reads for tok in t], dtype=torch.long, device=device)
    logp = torch.log_softmax(at(row, col + offsets[row]), dim=-1)  # (target tokens, vocab)
    tok_logp = logp.gather(1, tgt[:, None])[:, 0]
    nll, hit = -tok_logp.double(), (logp.argmax(-1) == tgt).double()
    above = (logp > tok_logp[:, None]).sum(-1)  # rank of each target token
    n = torch.tensor(lens, dtype=torch.float64, device=device)
    sum_nll = torch.zeros_like(n).index_add_(0, pair, nll)
    sum_hit = torch.zeros_like(n).index_add_(0, pair, hit)
    first = torch.cumsum(n, 0).long() - n.long()  # each pair's first target token
    per_pair = zip(
        (r[0] for _, r in reads),
        (sum_nll / n).tolist(),
        (sum_hit == n).tolist(),
        (sum_hit / n).tolist(),
        lens,
        above[first].tolist(),
    )
    out: list[list[tuple]] = [[] for _ in items]
    for (j, _), res in zip(reads, per_pair):
        out[j].append(res)
    return out


def fit_prefix(prefix: Sequence[int], target: Sequence[int], max_length: int) -> list[int]:
    """Drop tokens from the left of ``prefix`` so prefix + target fits ``max_length``."""
    keep = max(1, max_length - len(target))
    return list(prefix[-keep:])


def shared_rows(seqs: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Fewest rows covering ``seqs``: (rows, row index of each sequence); a sequence is a prefix of its row.

    In lexicographic order the sequences extending s follow s directly, so one backward sweep suffices.
    """
    cover: dict[tuple[int, ...], int] = {}
    rows: list[tuple[int, ...]] = []
    after: tuple[int, ...] | None = None
    for s in sorted(set(seqs), reverse=True):
        if after is not None and after[: len(s)] == s:
            cover[s] = cover[after]
        else:
            cover[s] = len(rows)
            rows.append(s)
        after = s
    return rows, [cover[s] for s in seqs]


def score_ids(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad: int,
    *,
    batch_rows: int = 64,
    padding_side: str = "right",
    one_by_one: bool = False,
    desc: str = "score",
) -> TargetScores:
    """Score (prefix ids, target ids) pairs: target token k is predicted at position len(prefix)-1+k.

    Prefixes longer than the model's context are cut on the left. Prefixes must be non-empty. Pairs
    share rows (module docstring); ``one_by_one`` gives every pair its own row and forward.
    """
    if not pairs:
        empty = np.zeros(0)
        return TargetScores(empty, empty.astype(bool), empty, empty.astype(int), empty.astype(int))
    limit = model_max_length(model)
    fitted = []
    for prefix, target in pairs:
        if not prefix or not target:
            raise ValueError("prefix and target must each have at least one token")
        fitted.append((fit_prefix(prefix, target, limit), list(target)))
    needed = [tuple(p + t[:-1]) for p, t in fitted]
    rows, where = (needed, list(range(len(needed)))) if one_by_one else shared_rows(needed)
    reads: list[list[Read]] = [[] for _ in rows]
    for k, ((p, t), r) in enumerate(zip(fitted, where)):
        reads[r].append((k, len(p) - 1, t))
    res = batched_forward(
        model,
        rows,
        pad,
        _target_reducer,
        reads,
        batch_rows=batch_rows,
        padding_side=padding_side,
        one_by_one=one_by_one,
        desc=desc,
    )
    _, nll, top1, acc, n, rank = zip(*sorted(x for row in res for x in row))
    return TargetScores(np.array(nll), np.array(top1, dtype=bool), np.array(acc), np.array(n), np.array(rank))


def score_targets(model: nn.Module, tokenizer: object, pairs: Sequence[tuple[str, str]], **kwargs: Any) -> TargetScores:
    """Score (prefix text, target text) pairs; targets get a leading space (:func:`encode_target`)."""
    return score_ids(
        model, [(encode(tokenizer, p), encode_target(tokenizer, t)) for p, t in pairs], pad_id(tokenizer), **kwargs
    )


# --------------------------------------------------------------------------- greedy answers


def greedy_answers(
    model: nn.Module,
    prefixes: Sequence[Sequence[int]],
    n_tokens: Sequence[int],
    pad: int,
    *,
    batch_rows: int = 64,
    one_by_one: bool = False,
    **_: Any,
) -> list[tuple[int, ...]]:
    """Greedy continuation of each prefix, ``n_tokens[i]`` tokens long: :func:`editflow.generation.decode`
    on length-sorted batches of one answer length (padding side is irrelevant: decode pads left)."""
    limit = model_max_length(model)
    seqs = [fit_prefix(p, [0] * n, limit) for p, n in zip(prefixes, n_tokens)]
    rows = 1 if one_by_one else batch_rows
    answers: list[tuple[int, ...]] = [()] * len(seqs)
    for n in sorted(set(n_tokens) - {0}):
        group = sorted((i for i, k in enumerate(n_tokens) if k == n), key=lambda i: len(seqs[i]))
        for i, a in zip(group, decode(model, [seqs[i] for i in group], pad, n, batch_rows=rows, desc="answers")):
            # The widest prompt of a batch caps its steps; a cut answer is redone alone (it then fits).
            answers[i] = tuple(a if len(a) == n else decode(model, [seqs[i]], pad, n, batch_rows=1)[0])
    return answers
