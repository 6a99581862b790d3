"""Target scoring: mean per-token NLL of ``" " + target`` after a prompt, batched."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def target_nll(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> list[float]:
    """Mean NLL of the tokens of ``" " + target`` following ``prompt``, for each (prompt, target)
    (editflow's batched scorer, :func:`editflow.evaluate.score_targets`)."""
    from editflow.evaluate import score_targets

    return score_targets(model, tok, pairs, batch_rows=batch_size).nll.tolist()


def preference_rate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, triples: list[tuple[str, str, str]], batch_size: int = 64
) -> float:
    """Fraction of (prompt, preferred, other) where NLL(preferred) < NLL(other)."""
    if not triples:
        return float("nan")
    a = target_nll(model, tok, [(p, x) for p, x, _ in triples], batch_size)
    b = target_nll(model, tok, [(p, y) for p, _, y in triples], batch_size)
    return sum(x < y for x, y in zip(a, b)) / len(triples)


def counterfact_triples(records: list[dict]) -> dict[str, list[tuple[str, str, str]]]:
    """(prompt, preferred, other) triples for the pre-edit checks: rewrite, paraphrase, neighbourhood."""
    out: dict[str, list[tuple[str, str, str]]] = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    for rec in records:
        rw = rec["requested_rewrite"]
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        out["rewrite"].append((rw["prompt"].format(rw["subject"]), true, new))
        out["paraphrase"] += [(p, true, new) for p in rec["paraphrase_prompts"]]
        out["neighborhood"] += [(p, true, new) for p in rec["neighborhood_prompts"]]
    return out
