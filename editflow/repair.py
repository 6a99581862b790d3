"""Lineage repair: a short constrained fine-tune of the edited matrices after MEMIT's closed-form solve.

Not part of the published algorithms; off unless ``MemitConfig.repair_steps`` > 0. MEMIT's solve
keeps unrelated text only through the key covariance C, and over a lineage of versions the small
drift each solve leaves adds up (measured: ``benchmarks/lifelong.py``). The repair starts from the
solved weights W_s and takes Adam steps on the same rewrite matrices only, minimising

    NLL(batch targets | the solve's context-template prompts), its gradient reaching the rewrite
        matrices only through their output at the subject's last token (where MEMIT writes)
    + repair_kl · KL(p_parent ‖ p) on statistics-corpus documents
    + repair_preserve · Σ_ℓ ‖(W_ℓ − W_s,ℓ) K_p‖² / ‖K_p‖²   (K_p: the lineage's earlier keys)
    + repair_replay · NLL(earlier facts' targets | their bare prompts), the same subject-only gradient
        (the facts the lineage already holds, from its versions' runs: rehearsal of earlier batches)
    + repair_anchor · KL(p_parent ‖ p) of the next token after the batch's attribute prompts
        (CounterFact's prompts of other, unedited subjects with the same relations)

so it can only trade the solve's result for lower drift from the parent (the model before this
edit) while holding the batch's targets and the earlier edits' outputs. ``repair_steps = 0`` leaves
MEMIT's result bit for bit.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import islice

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from editflow import memit, progress
from editflow.config import MemitConfig
from editflow.models import Adapter
from editflow.requests import EditRequest
from editflow.stats.batching import tokenize
from editflow.tokens import encode, encode_target, pad_id, pad_right

#: Corpus documents per step, and their length cap in tokens.
CORPUS_BATCH = 32
CORPUS_LENGTH = 64
#: Anchor prompts per step.
ANCHOR_BATCH = 64
#: Target rows (request × context template) per forward pass; gradients are accumulated over them.
ROWS_PER_PASS = 64


@dataclasses.dataclass
class _TargetRows:
    """Every (request, context template) prompt followed by its new target, with per-token weights."""

    ids: list[list[int]]
    weights: list[list[float]]  # 1 / (target length · rows of its request) at each target position
    fact_idx: list[int]  # the subject's last token in each row: where MEMIT writes


def target_rows(tokenizer: object, requests: Sequence[EditRequest], templates: Sequence[str]) -> _TargetRows:
    """Rows whose weighted NLL sums to the mean over requests of the template-mean target NLL."""
    targets = [encode_target(tokenizer, r.target_new) for r in requests]
    rows = memit.prompt_rows(tokenizer, requests, templates, suffix_ids=lambda i: targets[i])
    per_request = len(templates)
    weights = []
    for ids, owner in zip(rows.ids, rows.owner):
        n_t = len(targets[owner])
        w = 1.0 / (n_t * per_request * len(requests))
        weights.append([0.0] * (len(ids) - n_t) + [w] * n_t)  # weight on the position of each target token
    return _TargetRows(rows.ids, weights, rows.fact_idx)


def with_replay(rows: _TargetRows, earlier: _TargetRows, weight: float) -> _TargetRows:
    """``rows`` followed by ``earlier``'s rows, whose weights are scaled by ``weight`` (each set's
    weights sum to one, so ``weight`` is the earlier facts' mean NLL relative to the batch's)."""
    return _TargetRows(
        rows.ids + earlier.ids,
        rows.weights + [[weight * x for x in w] for w in earlier.weights],
        rows.fact_idx + earlier.fact_idx,
    )


def target_nll(
    model: nn.Module, rows: _TargetRows, pad: int, part: range, rewrites: Sequence[nn.Module] = ()
) -> torch.Tensor:
    """Weighted target NLL of ``rows[part]`` (a scalar with gradient). With ``rewrites``, the gradient
    reaches those modules' weights only through their output at each row's subject token."""
    device = next(model.parameters()).device
    batch = pad_right([rows.ids[j] for j in part], pad).to(device)
    w = pad_sequence([torch.tensor(rows.weights[j]) for j in part], batch_first=True).to(device)  # (b, w)
    at_subject = torch.zeros_like(batch.input_ids, dtype=torch.bool)  # (b, w)
    at_subject[torch.arange(len(part)), torch.tensor([rows.fact_idx[j] for j in part])] = True
    with gradient_only_at(rewrites, at_subject):
        logp = torch.log_softmax(model(**batch.model_inputs()).logits.float(), -1)  # (b, w, V)
    tok = logp[:, :-1].gather(2, batch.input_ids[:, 1:, None]).squeeze(2)  # (b, w-1): log p of token t+1
    return -(tok * w[:, 1:]).sum()


@contextmanager
def gradient_only_at(modules: Sequence[nn.Module], positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``modules``' outputs keep their values but carry gradient only at
    ``positions`` ((b, w) bool): out.detach() + m · (out − out.detach())."""

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        m = positions[..., None].to(out.dtype)  # (b, w, 1)
        return out.detach() + m * (out - out.detach())

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def parent_kl(
    model: nn.Module,
    parent: Mapping[str, torch.Tensor],
    seqs: Sequence[Sequence[int]],
    pad: int,
    last_only: bool = False,
) -> torch.Tensor:
    """Token-mean KL(p_parent ‖ p) over ``seqs`` (every position, or with ``last_only`` the next token
    after each sequence); ``parent`` holds the rewrite weights before the edit."""
    device = next(model.parameters()).device
    batch = pad_right(seqs, pad).to(device)
    mask = batch.attention_mask.float()  # (b, w)
    if last_only:
        mask = torch.zeros_like(mask)
        mask[torch.arange(len(seqs)), batch.lengths - 1] = 1.0
    backup = memit.set_weights(model, parent)
    try:
        with torch.no_grad():
            ref = torch.log_softmax(model(**batch.model_inputs()).logits.float(), -1)  # (b, w, V)
    finally:
        memit.restore(model, backup)
    logp = torch.log_softmax(model(**batch.model_inputs()).logits.float(), -1)
    kl = (ref.exp() * (ref - logp)).sum(-1)  # (b, w)
    return (kl * mask).sum() / mask.sum()


def anchor_prompts(tokenizer: object, requests: Sequence[EditRequest]) -> list[list[int]]:
    """Token ids of the requests' attribute prompts: other subjects, the same relations."""
    return [encode(tokenizer, p) for r in requests for p in r.attribute_prompts]


def preserved_change(
    weights: Mapping[str, torch.Tensor],
    solved: Mapping[str, torch.Tensor],
    grams: Mapping[str, torch.Tensor],
    conv1d: bool,
) -> torch.Tensor:
    """Σ_ℓ tr(D G Dᵀ) / tr G with D = W − W_s in (d × d_ff) layout: the mean squared change of the
    rewrite output on the earlier edits' keys, relative to their mean squared norm."""
    total = torch.zeros(())
    for name, g in grams.items():
        d = weights[name] - solved[name]
        d = d.T if conv1d else d  # (d, d_ff)
        total = total + ((d.float() @ g) * d.float()).sum() / g.trace().clamp_min(1e-12)
    return total


def repair(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    result: memit.EditResult,
    covs: Mapping[int, torch.Tensor],
    config: MemitConfig,
    corpus: Sequence[Sequence[int]],
    preserved: Mapping[int, torch.Tensor] | None = None,
    earlier: Sequence[EditRequest] = (),
) -> memit.EditResult:
    """Run the repair on a model that holds ``result`` applied; return the result with the total
    deltas, ratios and keys of the repaired model (which it then holds). ``earlier``: facts the
    lineage already holds, rehearsed on their bare prompts when ``config.repair_replay`` > 0."""
    if config.repair_steps <= 0:
        return result
    if not corpus:
        raise ValueError("the repair needs corpus documents for its KL term; the corpus gave none")
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    names = list(result.deltas)
    solved = {n: params[n].detach().clone() for n in names}
    parent = {n: solved[n] - result.deltas[n].to(solved[n].dtype) for n in names}
    grams = (
        {adapter.rewrite_weight(layer): preserved[layer].float() for layer in config.layers if preserved[layer].any()}
        if preserved is not None and config.repair_preserve > 0
        else {}
    )
    rows = target_rows(tokenizer, requests, result.context_templates)
    if earlier and config.repair_replay > 0:
        rows = with_replay(rows, target_rows(tokenizer, earlier, ["{}"]), config.repair_replay)
    anchors = anchor_prompts(tokenizer, requests) if config.repair_anchor > 0 else []
    pad = pad_id(tokenizer)
    rng = random.Random(config.seed)
    was_training, flags = model.training, {n: p.requires_grad for n, p in params.items()}
    model.eval()
    for p in params.values():
        p.requires_grad_(False)
    trained = [params[n] for n in names]
    for p in trained:
        p.requires_grad_(True)
    rewrites = [model.get_submodule(adapter.rewrite(layer)) for layer in config.layers]
    opt = torch.optim.Adam(trained, lr=config.repair_lr)
    try:
        for _ in progress.track(range(config.repair_steps), desc="repair", unit="step"):
            opt.zero_grad()
            for start in range(0, len(rows.ids), ROWS_PER_PASS):
                part = range(start, min(start + ROWS_PER_PASS, len(rows.ids)))
                target_nll(model, rows, pad, part, rewrites).backward()
            docs = rng.sample(list(corpus), min(CORPUS_BATCH, len(corpus)))
            # each KL term swaps the parent's weights in and out, so each is backpropagated before the next
            (config.repair_kl * parent_kl(model, parent, docs, pad)).backward()
            if anchors:
                sample = rng.sample(anchors, min(ANCHOR_BATCH, len(anchors)))
                (config.repair_anchor * parent_kl(model, parent, sample, pad, last_only=True)).backward()
            if grams:
                (config.repair_preserve * preserved_change(params, solved, grams, adapter.conv1d)).backward()
            opt.step()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    deltas = {n: (params[n].detach() - parent[n]) for n in names}
    for name, delta in deltas.items():
        memit.check_finite(delta, f"the repaired update of {name}")
    keys = {
        layer: memit.compute_keys(model, tokenizer, adapter, requests, layer, result.context_templates, layer)[
            0
        ].detach()
        for layer in config.layers
    }
    return dataclasses.replace(
        result,
        deltas=deltas,
        layer_update_ratios=memit.update_ratios(deltas, parent),
        layer_output_ratios=memit.effective_update_ratios(deltas, parent, covs, adapter),
        timings={**result.timings, "repair": time.perf_counter() - t0},
        keys=keys,
    )


def corpus_documents(texts: Iterable[str], tokenizer: object, n: int) -> list[list[int]]:
    """Token ids (at most :data:`CORPUS_LENGTH` each) of the first ``n`` documents of ``texts`` that
    have at least two tokens (the statistics pass's tokeniser)."""
    docs = (list(d.ids) for d in tokenize(texts, tokenizer, CORPUS_LENGTH) if len(d.ids) > 1)
    return list(islice(docs, n))
