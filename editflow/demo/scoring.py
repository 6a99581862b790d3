"""Target scoring: mean per-token NLL of ``" " + target`` after a prompt, batched."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def target_nll(model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
               batch_size: int = 64) -> list[float]:
    """Mean NLL of the tokens of ``" " + target`` following ``prompt``, for each (prompt, target)."""
    out: list[float] = []
    device = next(model.parameters()).device
    max_len = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1 << 30)
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        seqs, spans = [], []
        for prompt, target in chunk:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            t = tok(" " + target, add_special_tokens=False)["input_ids"]
            p = p[max(0, len(p) + len(t) - max_len):]  # keep the end of over-long prompts
            seqs.append(p + t)
            spans.append((len(p), len(p) + len(t)))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for j, (a, b) in enumerate(spans):
            tgt = ids[j, a:b].to(device)
            out.append(-logp[j, a - 1:b - 1].gather(-1, tgt[:, None]).mean().item())
    return out


def preference_rate(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    triples: list[tuple[str, str, str]], batch_size: int = 64) -> float:
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
