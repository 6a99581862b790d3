"""Drift: how much an edit moves the model on held-out text.

Reference (pre-edit, computed once by :func:`drift_reference`): the held-out texts are tokenised,
each cut to the model's context, and taken in order until ``max_tokens`` predicted tokens; for each
predicted position the reference stores the ``top_k`` most likely next-token ids (int32) with their
float32 log-probabilities, and the summed NLL of the actual next tokens (for perplexity).

After the edit (:func:`drift`):
- ``ppl`` = exp(mean NLL) on the same tokens, ``ppl_rel`` = ppl_post / ppl_pre − 1;
- ``kl`` = mean over positions of KL(p_pre ‖ p_post) on the (top_k + 1)-bucket coarsening of both
  distributions (the reference's top-k tokens, plus one bucket for the rest of the vocabulary). It is
  exact when ``top_k`` is the vocabulary size and otherwise a lower bound of the full KL (data
  processing inequality); it is 0 for an unchanged model. Units: nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editflow.evaluate.scoring import LogitsAt, batched_forward, model_max_length
from editflow.tokens import encode, pad_id


@dataclass(frozen=True)
class DriftReference:
    """Pre-edit state on the held-out slice (see the module docstring)."""

    seqs: list[list[int]]
    topk_ids: list[torch.Tensor]
    topk_logp: list[torch.Tensor]
    nll_sum: float
    n_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)


def heldout_sequences(tokenizer: object, texts: Sequence[str], max_tokens: int, max_length: int) -> list[list[int]]:
    """Token sequences of ``texts`` (each ≤ ``max_length``), ``max_tokens`` predicted tokens in all."""
    seqs, budget = [], max_tokens
    for text in texts:
        ids = encode(tokenizer, text)[:max_length][: budget + 1]
        if len(ids) < 2:
            continue
        seqs.append(ids)
        budget -= len(ids) - 1
        if budget <= 0:
            break
    return seqs


def _positions(
    at: LogitsAt, offsets: torch.Tensor, seqs: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs at every predicting position of each row, the next tokens, and the row of each position."""
    device = offsets.device
    row = torch.cat([torch.full((len(s) - 1,), j, dtype=torch.long) for j, s in enumerate(seqs)]).to(device)
    col = torch.cat([torch.arange(len(s) - 1) for s in seqs]).to(device) + offsets[row]
    nxt = torch.tensor([t for s in seqs for t in s[1:]], dtype=torch.long, device=device)
    return torch.log_softmax(at(row, col), dim=-1), nxt, row


def _split(t: torch.Tensor, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    return list(torch.split(t, [len(s) - 1 for s in seqs]))


def _reference_reducer(top_k: int):
    def reduce(at: LogitsAt, offsets: torch.Tensor, seqs: Sequence[Sequence[int]]) -> list:
        logp, nxt, _ = _positions(at, offsets, seqs)
        nll = -logp.gather(1, nxt[:, None])[:, 0].double()
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        return list(
            zip(
                [float(x.sum()) for x in _split(nll, seqs)],
                [x.int().cpu() for x in _split(top.indices, seqs)],
                [x.cpu() for x in _split(top.values, seqs)],
            )
        )

    return reduce


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, clamped away from log 0."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-12)))


def _drift_reducer(at: LogitsAt, offsets: torch.Tensor, items: Sequence[tuple]) -> list:
    seqs = [s for s, _, _ in items]
    logp, nxt, _ = _positions(at, offsets, seqs)
    nll = -logp.gather(1, nxt[:, None])[:, 0].double()
    ids = torch.cat([i for _, i, _ in items]).long().to(logp.device)
    p_log = torch.cat([v for _, _, v in items]).to(logp.device).double()
    q_log = logp.gather(1, ids).double()
    p_tail, q_tail = _log1mexp(p_log.logsumexp(-1)), _log1mexp(q_log.logsumexp(-1))
    kl = (p_log.exp() * (p_log - q_log)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    return [(float(a.sum()), float(b.sum())) for a, b in zip(_split(nll, seqs), _split(kl, seqs))]


def drift_reference(
    model: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    *,
    max_tokens: int = 1024,
    top_k: int = 64,
    batch_rows: int = 8,
    one_by_one: bool = False,
) -> DriftReference | None:
    """Pre-edit reference on ``texts`` (None when they yield no tokens)."""
    seqs = heldout_sequences(tokenizer, texts, max_tokens, model_max_length(model))
    if not seqs:
        return None
    res = batched_forward(
        model,
        seqs,
        pad_id(tokenizer),
        _reference_reducer(top_k),
        seqs,
        batch_rows=batch_rows,
        one_by_one=one_by_one,
        desc="drift reference",
    )
    return DriftReference(
        seqs=seqs,
        topk_ids=[r[1] for r in res],
        topk_logp=[r[2] for r in res],
        nll_sum=sum(r[0] for r in res),
        n_tokens=sum(len(s) - 1 for s in seqs),
    )


def drift(
    model: nn.Module, tokenizer: object, ref: DriftReference, *, batch_rows: int = 8, one_by_one: bool = False
) -> dict[str, float]:
    """``ppl``, ``ppl_rel`` and ``kl`` of the current model against ``ref`` (module docstring)."""
    items = list(zip(ref.seqs, ref.topk_ids, ref.topk_logp))
    res = batched_forward(
        model,
        ref.seqs,
        pad_id(tokenizer),
        _drift_reducer,
        items,
        batch_rows=batch_rows,
        one_by_one=one_by_one,
        desc="drift",
    )
    ppl = math.exp(sum(r[0] for r in res) / ref.n_tokens)
    return {"ppl": ppl, "ppl_rel": ppl / ref.ppl - 1.0, "kl": sum(r[1] for r in res) / ref.n_tokens}
