"""MEMIT and AlphaEdit: the edit math, as pure functions of a model, requests and covariances.

No I/O and no MLflow here, beyond progress bars (:mod:`editflow.progress`, on stderr). The steps
follow the published algorithm (Meng et al. 2023; Fang et al. 2025): batched target optimisation
(step 2), keys averaged over context templates, and the layer-by-layer closed-form update in float64
(step 3); on blocks that normalise the MLP output (Gemma 2/3, OLMo 2) each layer's residual share is
mapped to the module-output change that produces it. The public entry point is :func:`edit`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from editflow import nethook, progress
from editflow.config import MemitConfig
from editflow.models import Adapter
from editflow.requests import EditRequest
from editflow.tokens import (
    Batch,
    encode,
    encode_target,
    fact_token_index,
    model_positions,
    pad_id,
    pad_right,
)

TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")
KL_PROMPT = "{} is a"


# --------------------------------------------------------------------------- results


@dataclass
class RequestDiagnostics:
    """How target optimisation went for one request."""

    subject: str
    target_new: str
    loss: float
    prob_new: float
    delta_norm: float
    steps: int
    chunk: int = 0


@dataclass
class EditResult:
    """Weight deltas (in each weight's own layout, keyed by parameter name) and diagnostics."""

    deltas: dict[str, torch.Tensor]
    diagnostics: list[RequestDiagnostics]
    layer_update_norms: dict[str, float] = field(default_factory=dict)
    layer_update_ratios: dict[str, float] = field(default_factory=dict)  # ‖ΔW‖ / ‖W‖, total change
    layer_output_ratios: dict[str, float] = field(default_factory=dict)  # see effective_update_ratios
    timings: dict[str, float] = field(default_factory=dict)
    context_templates: list[str] = field(default_factory=list)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d_ff), after the edit


# --------------------------------------------------------------------------- weights


def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``deltas`` to the model's weights in place; return the original tensors (for :func:`restore`)."""
    params = dict(model.named_parameters())
    backup = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            p = params[name]
            backup[name] = p.detach().clone()
            p.add_(delta.to(p.device, p.dtype))
    return backup


def set_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Overwrite parameters with ``tensors``; return the replaced ones (for :func:`restore`)."""
    params = dict(model.named_parameters())
    backup = {}
    with torch.no_grad():
        for name, value in tensors.items():
            backup[name] = params[name].detach().clone()
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return backup


def restore(model: nn.Module, backup: Mapping[str, torch.Tensor]) -> None:
    """Put back weights saved by :func:`apply_deltas` (bit-exact undo)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, original in backup.items():
            params[name].copy_(original)


def undo_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Subtract ``deltas`` (undo without a backup; exact up to floating-point rounding)."""
    apply_deltas(model, {k: -v for k, v in deltas.items()})


# --------------------------------------------------------------------------- context templates


def context_templates(model: nn.Module, tokenizer: object, n: int, length: int, seed: int) -> list[str]:
    """``["{}"]`` plus ``n`` seeded short continuations of fixed words, each followed by ``". {}"``."""
    if n == 0:
        return ["{}"]
    device = next(model.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(n):
            ids = torch.tensor([encode(tokenizer, TEMPLATE_SEEDS[i % len(TEMPLATE_SEEDS)])], device=device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                pad_token_id=pad_id(tokenizer),
            )
            text = tokenizer.decode(gen[0], skip_special_tokens=True)  # type: ignore[attr-defined]
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return ["{}"] + out


# --------------------------------------------------------------------------- rows of prompts


@dataclass
class _Rows:
    """Prompts of several requests flattened into one padded batch."""

    ids: list[list[int]]
    fact_idx: list[int]
    owner: list[int]  # request index of each row


def prompt_rows(
    tokenizer: object,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    suffix_ids: Callable[[int], list[int]] | None = None,
) -> _Rows:
    """One row per (request, template): the templated prompt (+ optional suffix ids per request)."""
    rows = _Rows([], [], [])
    for i, r in enumerate(requests):
        for t in templates:
            prompt = t.replace("{}", r.prompt, 1) if t != "{}" else r.prompt
            ids = encode(tokenizer, prompt.format(r.subject))
            rows.ids.append(ids + (suffix_ids(i) if suffix_ids else []))
            rows.fact_idx.append(fact_token_index(tokenizer, prompt, r.subject))
            rows.owner.append(i)
    return rows


def _pad_shifted(sequences: Sequence[Sequence[int]], shifts: Sequence[int], pad: int) -> Batch:
    """A right-padded batch whose row i starts at column ``shifts[i]`` (masked left padding before it);
    ``lengths`` are the rows' end columns."""
    batch = pad_right([[pad] * s + list(seq) for s, seq in zip(shifts, sequences)], pad)
    cols = torch.arange(batch.input_ids.shape[1])
    batch.attention_mask[cols[None] < torch.tensor(shifts, dtype=torch.long)[:, None]] = 0
    return batch


def check_lengths(
    model: nn.Module, tokenizer: object, requests: Sequence[EditRequest], templates: Sequence[str]
) -> None:
    """Raise ``ValueError`` naming the first request whose longest row (context template, prompt and
    target) exceeds the model's positions (:func:`~editflow.tokens.model_positions`), before any work."""
    limit = model_positions(model)
    if not limit:
        return
    rows = prompt_rows(tokenizer, requests, templates, lambda i: encode_target(tokenizer, requests[i].target_new))
    for ids, owner in zip(rows.ids, rows.owner):
        if len(ids) > limit:
            r = requests[owner]
            raise ValueError(
                f"request {owner} (subject {r.subject!r}, prompt {r.prompt!r}): {len(ids)} tokens "
                f"with a context template and the target, more than the model's {limit} positions"
            )


def _chunks(n: int, size: int | None) -> list[range]:
    size = size or n
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _rewrite_inputs_and_block_outputs(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    rows: _Rows,
    rewrite_layer: int | None,
    block_layer: int,
    batch_rows: int = 256,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """At each row's fact token: the rewrite-module input of ``rewrite_layer`` and the output of block
    ``block_layer``, in batched forwards stopped after the deeper of the two."""
    device = next(model.parameters()).device
    ins = [adapter.rewrite(rewrite_layer)] if rewrite_layer is not None else []
    outs = [adapter.layer(block_layer)]
    stop = adapter.layer(max(block_layer, rewrite_layer if rewrite_layer is not None else -1))
    keys, hidden = [], []
    for part in _chunks(len(rows.ids), batch_rows):
        batch = pad_right([rows.ids[j] for j in part], pad_id(tokenizer)).to(device)
        idx = torch.tensor([rows.fact_idx[j] for j in part], device=device)
        arange = torch.arange(len(part), device=device)
        with (
            torch.no_grad(),
            nethook.capture(
                model, ins, outs, stop_after=stop, transform=lambda _n, t, arange=arange, idx=idx: t[arange, idx]
            ) as got,
        ):
            nethook.run_until_stopped(model, **batch.model_inputs())
        if ins:
            keys.append(got[ins[0]].float())
        hidden.append(got[outs[0]].float())
    return (torch.cat(keys) if keys else None), torch.cat(hidden)


# --------------------------------------------------------------------------- step 2: targets z


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap · tanh(logits / cap)`` (Gemma's final-logit soft-capping); ``logits`` when ``cap`` is None."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def final_logit_softcap(model: nn.Module) -> float | None:
    """The soft-cap the model's causal-LM forward applies to its logits (``final_logit_softcapping``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None)


def _logits_at(model: nn.Module, batch_inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities at the given (row, position) pairs: LM head only where needed, with
    the model's own final-logit soft-capping, so they equal the model's output there."""
    hidden = model.base_model(**batch_inputs).last_hidden_state
    head = model.get_output_embeddings()
    logits = soft_cap(head(hidden[rows, cols]).float(), final_logit_softcap(model))  # (len(rows), vocab)
    return torch.log_softmax(logits, dim=-1)


class _Cached(nn.Module):
    """Stands in for a transformer block whose output is already known: returns it, computes nothing."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output

    def forward(self, *_args: object, **_kwargs: object) -> object:
        return self.output


def compute_targets(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    config: MemitConfig,
    templates: Sequence[str],
    requests_per_batch: int | None = 64,
    prefix_cache: bool = True,
) -> tuple[torch.Tensor, list[RequestDiagnostics]]:
    """Optimise one residual vector z per request at the last edited layer (step 2).

    Requests are optimised together, ``requests_per_batch`` at a time: each has its own δ and its own
    loss, and finished requests are frozen, so the result equals a one-request-at-a-time loop
    (``requests_per_batch=1``, the reference structure) up to floating-point rounding.
    With ``prefix_cache`` the rows are left-padded so that every fact token sits at one column P, and
    what δ cannot change is computed once: the output of blocks 0..L, and the keys/values of columns
    before P (causal attention: δ, added at column P, never reaches them). Each optimisation step then
    runs only the blocks above L, on columns P.. only. ``False`` runs the full model every step (the
    plain path, the reference; same result up to rounding).
    """
    # Requests of similar length share a micro-batch, so little compute goes to padding.
    order = sorted(range(len(requests)), key=lambda i: len(encode(tokenizer, requests[i].text)))
    zs, diags = [], []
    groups = _chunks(len(requests), requests_per_batch)
    with (
        frozen_weights(model),
        progress.bar(total=len(groups) * config.v_num_grad_steps, desc="targets", unit="step") as bar,
    ):
        for part in groups:
            idx = [order[i] for i in part]
            z, d = _optimise_group(
                model, tokenizer, adapter, [requests[i] for i in idx], config, templates, prefix_cache, bar
            )
            zs.append(z)
            diags.extend(d)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    z_all = torch.cat(zs)
    return z_all[inverse.to(z_all.device)], [diags[i] for i in inverse.tolist()]


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Turn off gradients of the model's parameters (only δ is optimised)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class _TargetLayout:
    """The rows of one group's target optimisation and where the loss reads them.

    Rows are the rewriting prompts (request × context template, each followed by its target but the
    last token) and, with a KL weight, one ``"{subject} is a"`` row per request. With the prefix cache
    each row is shifted right so that its fact token sits at one column ``p`` (``p = 0``: plain right
    padding). Target token j of a row is predicted at column ``t_cols[j]`` of row ``t_rows[j]``.
    """

    batch: Batch  # (rows, width) shifted, right padded
    p: int
    fact_col: torch.Tensor  # (rows,) the fact token's column
    owner: torch.Tensor  # (rows,) request index of each row
    n_rw: int  # rewriting rows come first, KL rows after them
    targets: list[list[int]]  # per request, the target's token ids
    t_rows: torch.Tensor  # (target tokens,)
    t_cols: torch.Tensor  # (target tokens,)
    t_ids: torch.Tensor  # (target tokens,)
    tok_weight: torch.Tensor  # (target tokens,) 1 / target length
    rows_per_req: torch.Tensor  # (n,) rewriting rows per request
    kl_rows: torch.Tensor  # (n or 0,)
    bare_rows: torch.Tensor  # (n,) the row of each request's bare prompt (template "{}")

    @property
    def n_rows(self) -> int:
        return int(self.batch.input_ids.shape[0])

    @property
    def kl_cols(self) -> torch.Tensor:
        return self.fact_col[self.n_rw :]


def _target_layout(
    tokenizer: object,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    config: MemitConfig,
    prefix_cache: bool,
    device: torch.device,
) -> _TargetLayout:
    """Tokenise one group's rows once and lay them out for the optimisation loop."""
    n = len(requests)
    targets = [encode_target(tokenizer, r.target_new) for r in requests]
    rw = prompt_rows(tokenizer, requests, templates, suffix_ids=lambda i: targets[i][:-1])
    kl = _Rows([], [], [])
    if config.kl_factor > 0:  # "{subject} is a": the next-token distribution to keep
        for i, r in enumerate(requests):
            kl.ids.append(encode(tokenizer, KL_PROMPT.format(r.subject)))
            kl.fact_idx.append(fact_token_index(tokenizer, KL_PROMPT, r.subject))
            kl.owner.append(i)
    all_ids, facts = rw.ids + kl.ids, rw.fact_idx + kl.fact_idx
    p = max(facts) if prefix_cache else 0
    shift = [p - f for f in facts] if prefix_cache else [0] * len(facts)
    batch = _pad_shifted(all_ids, shift, pad_id(tokenizer)).to(device)
    fact_col = torch.tensor([f + s for f, s in zip(facts, shift)], device=device)  # (rows,)
    n_rw = len(rw.ids)
    # The last len(target) positions of each rewriting row predict the target.
    t_rows, t_cols, t_ids = [], [], []
    for row, ids in enumerate(rw.ids):
        tgt = targets[rw.owner[row]]
        start = shift[row] + len(ids) - len(tgt)  # the position before each target token predicts it
        t_rows.extend([row] * len(tgt))
        t_cols.extend(range(start, start + len(tgt)))
        t_ids.extend(tgt)
    return _TargetLayout(
        batch=batch,
        p=p,
        fact_col=fact_col,
        owner=torch.tensor(rw.owner + kl.owner, device=device),
        n_rw=n_rw,
        targets=targets,
        t_rows=torch.tensor(t_rows, device=device),
        t_cols=torch.tensor(t_cols, device=device),
        t_ids=torch.tensor(t_ids, device=device),
        tok_weight=torch.tensor([1.0 / len(targets[rw.owner[r]]) for r in t_rows], device=device),
        rows_per_req=torch.bincount(torch.tensor(rw.owner, device=device), minlength=n).float(),
        kl_rows=torch.arange(n_rw, n_rw + len(kl.ids), device=device),
        bare_rows=torch.tensor([rw.owner.index(i) for i in range(n)], device=device),
    )


@dataclass
class _PrefixState:
    """What δ cannot change, computed once: block L's output from column p on (h_L, and what blocks
    0..L return when cached) and, with the prefix cache, every layer's keys/values of columns < p."""

    block_out: object  # the block's raw output (tuple or tensor)
    hidden: torch.Tensor  # (rows, width − p, d)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (rows, heads, p, head_dim) ×2
    positions: torch.Tensor  # (rows, width) positions that ignore the left padding


def _prefix_state(
    model: nn.Module, adapter: Adapter, layout: _TargetLayout, layer: int, prefix_cache: bool
) -> _PrefixState:
    """One no-grad forward of the group's rows (every layer when caching the prefix)."""
    batch, p = layout.batch, layout.p
    positions = (batch.attention_mask.cumsum(1) - 1).clamp_min(0)  # (rows, width)
    inputs = {**batch.model_inputs(), "use_cache": prefix_cache}
    cache = nethook.new_cache()
    if prefix_cache:
        inputs |= {"position_ids": positions, nethook.cache_kwarg(model.base_model): cache}
    last = adapter.layer(adapter.n_layers - 1) if prefix_cache else None  # fill every layer's cache
    with torch.no_grad():
        block_out = nethook.output_of(model, adapter.layer(layer), stop_after=last, **inputs)
    hidden = nethook.first_tensor(block_out)[:, p:]  # (rows, width − p, d)
    return _PrefixState(block_out, hidden, nethook.cache_prefix(cache, p), positions)


def _logp_at(
    model: nn.Module,
    adapter: Adapter,
    layout: _TargetLayout,
    prefix: _PrefixState,
    layer: int,
    delta: torch.Tensor,
    sel: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    prefix_cache: bool,
) -> torch.Tensor:
    """Log-probabilities (len(rows), vocab) at (``rows`` indexing ``sel``, ``cols``) for the batch rows
    ``sel``, with δ added to block L's output at their fact tokens."""
    batch, p = layout.batch, layout.p
    width = int(batch.lengths[sel].max())
    inputs = {
        "input_ids": batch.input_ids[sel, p:width],
        "attention_mask": batch.attention_mask[sel, :width],
        "use_cache": prefix_cache,
    }
    at = (torch.arange(len(sel), device=sel.device), layout.fact_col[sel] - p)

    def add_delta(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[at] = (h[at].float() + delta[layout.owner[sel]]).to(h.dtype)
        return h

    stand_ins: dict[str, nn.Module] = {}
    if prefix_cache:  # columns < p come from the KV cache; blocks 0..L return their cached output
        inputs |= {
            "position_ids": prefix.positions[sel, p:width],
            nethook.cache_kwarg(model.base_model): nethook.new_cache([(k[sel], v[sel]) for k, v in prefix.prefix_kv]),
        }
        cached = nethook.replace_first_tensor(prefix.block_out, prefix.hidden[sel, : width - p])
        stand_ins = {adapter.layer(i): _Cached(cached) for i in range(layer + 1)}
    with nethook.replace_modules(model, stand_ins), nethook.patch_output(model, adapter.layer(layer), add_delta):
        return _logits_at(model, inputs, rows, cols - p)


def _step_loss(
    layout: _TargetLayout,
    logp: torch.Tensor,
    t_on: torch.Tensor,
    k_on: torch.Tensor,
    delta: torch.Tensor,
    init_norm: torch.Tensor,
    config: MemitConfig,
    kl_init: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-request loss (n,): mean NLL of the target tokens over the request's rows (each divided by
    the target length), + weight decay ‖δ‖/‖h‖², + ``kl_factor`` · KL(p_δ ‖ p₀) at ``"{subject} is a"``;
    and the reference distribution p₀ (taken at the first step)."""
    n, device = len(layout.targets), delta.device
    n_t = int(t_on.sum())
    logp_kl = logp[n_t:]  # (KL rows on, vocab)
    tok_lp = logp[:n_t].gather(1, layout.t_ids[t_on][:, None]).squeeze(1)  # (target tokens on,)
    row_nll = torch.zeros(layout.n_rw, device=device).index_add(
        0, layout.t_rows[t_on], -tok_lp * layout.tok_weight[t_on]
    )  # (rewriting rows,)
    nll = torch.zeros(n, device=device).index_add(0, layout.owner[: layout.n_rw], row_nll) / layout.rows_per_req
    loss = nll + config.v_weight_decay * delta.norm(dim=1) / init_norm**2  # (n,)
    if config.kl_factor > 0:
        if kl_init is None:
            kl_init = logp_kl.detach().clone()
        # KL(p_delta || p_0), as in the ROME/MEMIT papers (and the MEMIT code's kl_div call).
        kl_term = torch.zeros(n, device=device).index_add(
            0, layout.owner[layout.kl_rows[k_on]], (logp_kl.exp() * (logp_kl - kl_init[k_on])).sum(-1)
        )
        loss = loss + config.kl_factor * kl_term
    return loss, kl_init


def _clamp_(delta: torch.Tensor, init_norm: torch.Tensor, factor: float) -> None:
    """Project each δ_i into the ball of radius ``factor`` · ‖h_i‖ (in place)."""
    max_norm = factor * init_norm
    norm = delta.norm(dim=1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    delta.mul_(scale[:, None])


def _optimise_group(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    config: MemitConfig,
    templates: Sequence[str],
    prefix_cache: bool,
    bar: object | None = None,
) -> tuple[torch.Tensor, list[RequestDiagnostics]]:
    """Optimise δ for one group of requests together; ``bar`` advances one step per optimiser step
    (and by the steps left when every request stops early)."""
    device = next(model.parameters()).device
    n, layer = len(requests), config.layers[-1]
    layout = _target_layout(tokenizer, requests, templates, config, prefix_cache, device)
    prefix = _prefix_state(model, adapter, layout, layer, prefix_cache)
    bare = layout.bare_rows
    target_init = prefix.hidden[bare, layout.fact_col[bare] - layout.p].float()  # (n, d), at the bare prompt
    init_norm = target_init.norm(dim=1)  # (n,)
    delta = torch.zeros_like(target_init, requires_grad=True)  # (n, d)
    opt = torch.optim.Adam([delta], lr=config.v_lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long)
    final_loss = torch.zeros(n)
    kl_init: torch.Tensor | None = None

    for it in range(config.v_num_grad_steps):
        opt.zero_grad()
        # Only rows of requests still optimising take part (finished requests cost nothing).
        row_on = active[layout.owner]  # (rows,)
        sel = row_on.nonzero().squeeze(1)
        remap = torch.full((layout.n_rows,), -1, dtype=torch.long, device=device)
        remap[sel] = torch.arange(len(sel), device=device)
        t_on, k_on = row_on[layout.t_rows], row_on[layout.kl_rows]
        logp = _logp_at(
            model,
            adapter,
            layout,
            prefix,
            layer,
            delta,
            sel,
            torch.cat([remap[layout.t_rows[t_on]], remap[layout.kl_rows[k_on]]]),
            torch.cat([layout.t_cols[t_on], layout.kl_cols[k_on]]),
            prefix_cache,
        )
        loss, kl_init = _step_loss(layout, logp, t_on, k_on, delta, init_norm, config, kl_init)
        with torch.no_grad():
            final_loss[active.cpu()] = loss.detach().cpu()[active.cpu()]
            steps[active.cpu()] += 1
            step_loss = loss.detach()[active]
            active &= loss.detach() >= config.v_early_stop_loss
            _show_step(bar, step_loss, int(active.sum()), n)
        if not bool(active.any()) or it == config.v_num_grad_steps - 1:
            if bar is not None:
                bar.update(config.v_num_grad_steps - it - 1)  # type: ignore[attr-defined]
            break
        frozen = delta.detach().clone()
        (loss * active.float()).sum().backward()
        opt.step()
        with torch.no_grad():
            _clamp_(delta, init_norm, config.clamp_norm_factor)
            delta[~active] = frozen[~active]

    mean_lp = _bare_target_logprob(model, adapter, layout, prefix, layer, delta, prefix_cache)
    z = (target_init + delta).detach()
    diags = [
        RequestDiagnostics(
            r.subject,
            r.target_new,
            float(final_loss[i]),
            float(mean_lp[i].exp()),
            float(delta[i].detach().norm()),
            int(steps[i]),
        )
        for i, r in enumerate(requests)
    ]
    return z, diags


def _bare_target_logprob(
    model: nn.Module,
    adapter: Adapter,
    layout: _TargetLayout,
    prefix: _PrefixState,
    layer: int,
    delta: torch.Tensor,
    prefix_cache: bool,
) -> torch.Tensor:
    """Per request (n,), the mean log-probability of its target tokens on the bare prompt, with δ."""
    device = delta.device
    with torch.no_grad():
        bare_tok = torch.isin(layout.t_rows, layout.bare_rows)
        logp = _logp_at(
            model,
            adapter,
            layout,
            prefix,
            layer,
            delta,
            torch.arange(layout.n_rows, device=device),
            layout.t_rows[bare_tok],
            layout.t_cols[bare_tok],
            prefix_cache,
        )
        lp = logp.gather(1, layout.t_ids[bare_tok][:, None]).squeeze(1)
        owners = layout.owner[layout.t_rows[bare_tok]]
        lengths = torch.tensor([len(t) for t in layout.targets], device=device)
        return torch.zeros(len(layout.targets), device=device).index_add(0, owners, lp) / lengths


def _show_step(bar: object | None, losses: torch.Tensor, still: int, n: int) -> None:
    """One optimiser step on the progress bar: the mean loss of the requests that took part, and how
    many of the ``n`` are still optimising after it."""
    if bar is None:
        return
    bar.set_postfix(
        optimising=f"{still}/{n}",
        loss=f"{float(losses.mean()):.3f}",  # type: ignore[attr-defined]
        refresh=False,
    )
    bar.update(1)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- step 3: the solve


def memit_update(
    keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float, preserved: torch.Tensor | None = None
) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, with K (d_ff × n), R (d × n), C (d_ff × d_ff); -> (d × d_ff).

    With ``preserved`` = K_p K_pᵀ of earlier edits (MEMIT's sequential setting, Meng et al. 2023 §3:
    the keys already written join the keys to preserve): ΔW = R Kᵀ (λC + K_p K_pᵀ + K Kᵀ)⁻¹.
    """
    k, r, c = keys.double(), resid.double(), cov.to(keys.device).double()
    a = lam * c + k @ k.T  # (d_ff × d_ff)
    if preserved is not None:
        a = a + preserved.to(keys.device).double()
    adj_k = torch.linalg.solve(a, k)  # (λC [+ K_p K_pᵀ] + KKᵀ)⁻¹ K
    return r @ adj_k.T


def nullspace_projector(cov: torch.Tensor, threshold: float, energy: float = 0.0) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors of C with eigenvalue below ``threshold`` (AlphaEdit).

    With ``energy`` > 0 the threshold is relative instead: U spans the smallest eigen-directions of C
    whose eigenvalues together hold at most ``energy`` of its trace (the directions the preserved keys
    carry that share of their energy in). AlphaEdit's absolute 1e-2-scale threshold presumes one
    model's key scale; on another (the bundled model's first layer, all eigenvalues ≥ 0.024) it can
    leave no null space at all."""
    evals, evecs = torch.linalg.eigh(cov.double())  # ascending
    if energy > 0:
        share = torch.cumsum(evals.clamp_min(0), 0) / evals.clamp_min(0).sum()  # (d_ff,)
        u = evecs[:, share <= energy]
    else:
        u = evecs[:, evals < threshold]
    return u @ u.T


def alphaedit_update(
    keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, preserved: torch.Tensor, alpha: float
) -> torch.Tensor:
    """ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹ (AlphaEdit), in float64; -> (d × d_ff)."""
    k, r, p = keys.double(), resid.double(), projector.to(keys.device).double()
    kp = preserved.to(keys.device).double()
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    sol = torch.linalg.solve(p @ (k @ k.T + kp) + alpha * eye, p @ k @ r.T)  # (d_ff × d)
    return sol.T


def post_norm_output_delta(
    m: torch.Tensor, normed: torch.Tensor, resid: torch.Tensor, gain: torch.Tensor
) -> torch.Tensor:
    """Δm such that norm(m + Δm) = norm(m) + r, for a post-MLP RMS norm norm(x) = g ⊙ x / rms(x).

    ``m`` (n, d): the rewrite-module output at the fact token; ``normed`` (n, d): norm(m) as the
    model computes it; ``resid`` (n, d): r, the wanted change of the residual stream; ``gain`` (d,):
    the norm's effective gain g, needed only up to a positive factor (e.g. norm(1) = g / √(1 + ε)).

    RMSNorm sees only the direction of its input, so norm(x) = y holds for every x = s · y / g, s > 0:
    the inverse is exact up to scale. With y = norm(m) + r and u = y / g (so u ∝ m when r = 0), take
    x = ‖m‖ · u / ‖u‖ (the module output keeps m's scale) and Δm = x − m:

        Δm = ‖m‖ · u / ‖u‖ − m,   u = (norm(m) + r) / g.

    Exact (up to ε / mean(x²)) when y is an output the norm can produce; otherwise norm(m + Δm) =
    y / rms(y / g), y rescaled onto the norm's image (its nearest point when g is uniform). Coordinates
    whose gain is (near) zero cannot be steered; they keep m's value. Float64 in and out.
    """
    m, normed, resid, gain = m.double(), normed.double(), resid.double(), gain.double()
    good = gain.abs() > 1e-6 * gain.abs().max()  # (d,)
    g = torch.where(good, gain, torch.ones_like(gain))  # (d,)
    # m in u's units: normed / g = c · m on the coordinates with a gain, c = 1 / (its scale · rms(m))
    c = (normed / g * good).norm(dim=1) / (m * good).norm(dim=1).clamp_min(1e-30)  # (n,)
    u = torch.where(good, (normed + resid) / g, c[:, None] * m)  # (n, d)
    x = u * (m.norm(dim=1) / u.norm(dim=1).clamp_min(1e-30))[:, None]  # (n, d)
    return x - m


# --------------------------------------------------------------------------- one MEMIT call


@dataclass
class _SolveState:
    """What the solve carries from chunk to chunk: AlphaEdit's null-space projectors (None for MEMIT)
    and K_p K_pᵀ of the edits to preserve (None: plain MEMIT, which preserves only C)."""

    projectors: dict[int, torch.Tensor] | None
    preserved: dict[int, torch.Tensor] | None


def key_weights(n_templates: int) -> torch.Tensor:
    """Averaging weights over templates: the bare prompt ½, the prefixed ones sharing the other ½."""
    if n_templates == 1:
        return torch.ones(1)
    rest = torch.full((n_templates - 1,), 0.5 / (n_templates - 1))
    return torch.cat([torch.tensor([0.5]), rest])


def compute_keys(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    block_layer: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K (n × d_ff, template-averaged rewrite inputs) and h (n × d, block output at the bare prompt)."""
    rows = prompt_rows(tokenizer, requests, templates)
    ks, hs = _rewrite_inputs_and_block_outputs(model, tokenizer, adapter, rows, layer, block_layer)
    n, t = len(requests), len(templates)
    w = key_weights(t).to(ks.device)
    keys = (ks.view(n, t, -1) * w[None, :, None]).sum(1)
    return keys, hs.view(n, t, -1)[:, 0]


def rewrite_outputs(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    layer: int,
    batch_rows: int = 256,
) -> torch.Tensor:
    """m (n × d): the rewrite module's output at the fact token of each bare prompt (float32)."""
    device = next(model.parameters()).device
    rows = prompt_rows(tokenizer, requests, ["{}"])
    name = adapter.rewrite(layer)
    out = []
    for part in _chunks(len(rows.ids), batch_rows):
        batch = pad_right([rows.ids[j] for j in part], pad_id(tokenizer)).to(device)
        idx = torch.tensor([rows.fact_idx[j] for j in part], device=device)
        at = (torch.arange(len(part), device=device), idx)
        with (
            torch.no_grad(),
            nethook.capture(model, outputs_of=[name], stop_after=name, transform=lambda _n, t, at=at: t[at]) as got,
        ):
            nethook.run_until_stopped(model, **batch.model_inputs())
        out.append(got[name].float())  # (len(part), d)
    return torch.cat(out)


def post_norm_gain(norm: nn.Module, d: int, like: torch.Tensor) -> torch.Tensor:
    """The effective gain g (d,) of an RMS norm, up to a positive factor: norm(1) = g / √(1 + ε)."""
    with torch.no_grad():
        return norm(torch.ones(1, d, dtype=like.dtype, device=like.device)).float()[0]  # (d,)


def _module_output_change(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    layer: int,
    resid: torch.Tensor,
) -> torch.Tensor:
    """What the rewrite module's output must change by (d × n) for the residual stream to change by
    ``resid`` (d × n): ``resid`` itself on pre-norm blocks, :func:`post_norm_output_delta` behind a
    post-MLP norm."""
    if adapter.post_mlp_norm_tmp is None:
        return resid
    norm = nethook.get_module(model, adapter.post_mlp_norm(layer))  # type: ignore[arg-type]
    like = nethook.get_module(model, adapter.rewrite(layer)).weight  # the dtype the norm receives
    m = rewrite_outputs(model, tokenizer, adapter, requests, layer)  # (n, d)
    with torch.no_grad():
        normed = norm(m.to(like.dtype)).float()  # (n, d)
    gain = post_norm_gain(norm, adapter.d_model, like)
    return post_norm_output_delta(m, normed, resid.T, gain).T  # float64


def _weight_layout(delta: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A (d × d_ff) update in the stored layout of the rewrite weight (Conv1D stores it transposed)."""
    return delta.T if conv1d else delta


class NonFiniteUpdate(ValueError):
    """A target vector or a weight update that is not finite (a poisoned covariance, an overflow):
    nothing is applied or registered from it."""


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteUpdate` naming ``what`` unless every entry of ``t`` is finite."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteUpdate(f"{what} has {bad} non-finite entries; nothing was applied")


def update_ratios(deltas: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖ΔW‖ / ‖W‖ per edited weight (Frobenius norms; W before the edit)."""
    return {n: float(d.double().norm() / originals[n].double().norm().clamp_min(1e-30)) for n, d in deltas.items()}


def effective_update_ratios(
    deltas: Mapping[str, torch.Tensor],
    originals: Mapping[str, torch.Tensor],
    covs: Mapping[int, torch.Tensor],
    adapter: Adapter,
) -> dict[str, float]:
    """√(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)) per edited layer: how much the update changes the layer's output on
    keys distributed like the corpus (C = E[k kᵀ]), relative to the output itself. Unlike ‖ΔW‖/‖W‖ it
    ignores directions the keys never take (near-null directions of C, where MEMIT's solve is free)."""
    out = {}
    for layer, cov in covs.items():
        name = adapter.rewrite_weight(layer)
        if name not in deltas:
            continue
        c = cov.double().to(deltas[name].device)
        dw = _weight_layout(deltas[name], adapter.conv1d).double()  # (d, d_ff)
        w = _weight_layout(originals[name], adapter.conv1d).double()  # (d, d_ff)
        num, den = float(((dw @ c) * dw).sum()), float(((w @ c) * w).sum())  # ≥ 0 but for rounding (C is PSD)
        finite = all(map(lambda x: x == x and abs(x) != float("inf"), (num, den)))
        out[name] = (max(num, 0.0) / den) ** 0.5 if finite and den > 0 else float("nan")
    return out


def solve_layers(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    z: torch.Tensor,
    covs: Mapping[int, torch.Tensor],
    config: MemitConfig,
    templates: Sequence[str],
    state: _SolveState | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Step 3: spread z − h_L (``z``: n × d) over ``config.layers``, each layer's update added to the
    model before the next layer's keys; returns the deltas (stored layout) and their norms.

    On blocks with a post-MLP norm each layer's residual share is first mapped to the change of the
    rewrite module's output that produces it (:func:`post_norm_output_delta`).
    """
    params = dict(model.named_parameters())
    last = config.layers[-1]
    deltas, norms = {}, {}
    for i, layer in enumerate(progress.track(config.layers, desc="solve", unit="layer")):
        keys, h_now = compute_keys(model, tokenizer, adapter, requests, layer, templates, last)
        share = (z - h_now).T / (len(config.layers) - i)  # (d × n) share for this layer
        resid = _module_output_change(model, tokenizer, adapter, requests, layer, share)  # (d × n)
        k = keys.T  # (d_ff × n)
        preserved = state.preserved[layer] if state is not None and state.preserved is not None else None
        if state is not None and state.projectors is not None:
            upd = alphaedit_update(k, resid, state.projectors[layer], preserved, config.alphaedit_l2)
        else:
            upd = memit_update(k, resid, covs[layer], config.mom2_update_weight, preserved)
        name = adapter.rewrite_weight(layer)
        w = params[name]
        check_finite(upd, f"the update of layer {layer} ({name})")
        delta = _weight_layout(upd, adapter.conv1d).to(w.dtype)
        with torch.no_grad():
            w.add_(delta.to(w.device))
        deltas[name] = delta.to(w.device)
        norms[name] = float(upd.norm())
    return deltas, norms


def _memit_chunk(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    covs: Mapping[int, torch.Tensor],
    config: MemitConfig,
    templates: Sequence[str],
    state: _SolveState,
    timings: dict[str, float],
    requests_per_batch: int | None,
    prefix_cache: bool,
) -> tuple[dict[int, torch.Tensor], list[RequestDiagnostics], dict[str, float]]:
    """One MEMIT (or AlphaEdit) call over ``requests``; the model holds the update afterwards.

    Returns each layer's keys of ``requests`` on the updated model (n × d_ff: what later edits must
    preserve), the diagnostics and the update norms."""
    t0 = time.perf_counter()
    z, diags = compute_targets(model, tokenizer, adapter, requests, config, templates, requests_per_batch, prefix_cache)
    check_finite(z, "the target vectors z")
    timings["targets"] = timings.get("targets", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    _, norms = solve_layers(model, tokenizer, adapter, requests, z, covs, config, templates, state)
    written: dict[int, torch.Tensor] = {}
    for layer in config.layers:  # this chunk's keys, so later chunks (and versions) preserve them
        keys, _ = compute_keys(model, tokenizer, adapter, requests, layer, templates, layer)  # (n, d_ff)
        written[layer] = keys.detach()
        if state.preserved is not None:
            state.preserved[layer] = state.preserved[layer] + (keys.T.double() @ keys.double())
    timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t0
    return written, diags, norms


def check_module_overrides(adapter: Adapter, config: MemitConfig) -> None:
    """``ValueError`` when ``config.layer_tmp``/``rewrite_tmp`` name other modules than ``adapter``
    edits (the adapter must come from ``models.with_module_overrides``)."""
    for key, used in (("layer_tmp", adapter.layer_tmp), ("rewrite_tmp", adapter.rewrite_tmp)):
        wanted = getattr(config, key)
        if wanted is not None and wanted != used:
            raise ValueError(
                f"config.{key} is {wanted!r} but the adapter edits {used!r}; build the adapter "
                "with editflow.models.with_module_overrides(handle, config.layer_tmp, "
                "config.rewrite_tmp)"
            )


def edit(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    requests: Sequence[EditRequest],
    covs: Mapping[int, torch.Tensor],
    config: MemitConfig,
    on_chunk: Callable[[int, Sequence[EditRequest], list[RequestDiagnostics]], None] | None = None,
    requests_per_batch: int | None = 64,
    keep_applied: bool = False,
    prefix_cache: bool = True,
    preserved: Mapping[int, torch.Tensor] | None = None,
) -> EditResult:
    """Edit ``requests`` into the model with MEMIT or AlphaEdit, in batch or sequential mode.

    ``covs[layer]`` is C = E[k kᵀ] of the rewrite-module input. In sequential mode the requests go in
    chunks of ``config.chunk_size``, each on the result of the previous; ``on_chunk(i, chunk, diags)``
    is called after each chunk while the model holds the weights so far (for per-chunk evaluation).
    The returned deltas are the total change. The model is restored to its original weights unless
    ``keep_applied``. ``requests_per_batch`` and ``prefix_cache`` choose how targets are computed
    (see :func:`compute_targets`), not what they are.

    ``preserved[layer]`` = K_p K_pᵀ (d_ff × d_ff) of edits made before this call (a lineage's earlier
    versions): AlphaEdit always preserves them, MEMIT when ``config.preserve_edits``; both then also
    preserve each chunk's keys in the chunks after it. ``EditResult.keys`` holds this call's keys.
    """
    if not requests:
        raise ValueError("no requests to edit")
    check_module_overrides(adapter, config)
    missing = [layer for layer in config.layers if layer not in covs]
    if missing:
        raise ValueError(f"no covariance for layer(s) {missing}")
    if any(layer >= adapter.n_layers for layer in config.layers):
        raise ValueError(f"layers {list(config.layers)} out of range for a {adapter.n_layers}-layer model")
    was_training = model.training
    model.eval()
    names = [adapter.rewrite_weight(layer) for layer in config.layers]
    params = dict(model.named_parameters())
    original = {n: params[n].detach().clone() for n in names}
    timings: dict[str, float] = {}
    templates = context_templates(
        model, tokenizer, config.context_templates, config.context_template_length, config.seed
    )
    check_lengths(model, tokenizer, requests, templates)
    state = _solve_state(model, adapter, covs, config, preserved)
    size = config.chunk_size if config.mode == "sequential" else len(requests)
    diagnostics: list[RequestDiagnostics] = []
    norms: dict[str, float] = {}
    written: dict[int, list[torch.Tensor]] = {layer: [] for layer in config.layers}
    try:
        for c, part in enumerate(_chunks(len(requests), size)):
            chunk = [requests[i] for i in part]
            keys, diags, chunk_norms = _memit_chunk(
                model,
                tokenizer,
                adapter,
                chunk,
                covs,
                config,
                templates,
                state,
                timings,
                requests_per_batch,
                prefix_cache,
            )
            for layer, k in keys.items():
                written[layer].append(k.cpu())
            for d in diags:
                d.chunk = c
            diagnostics.extend(diags)
            for k, v in chunk_norms.items():
                norms[k] = norms.get(k, 0.0) + v
            if on_chunk is not None:
                on_chunk(c, chunk, diags)
        deltas = {n: (params[n].detach() - original[n]) for n in names}
    finally:
        if not keep_applied:
            restore(model, original)
        model.train(was_training)
    return EditResult(
        deltas=deltas,
        diagnostics=diagnostics,
        layer_update_norms=norms,
        layer_update_ratios=update_ratios(deltas, original),
        layer_output_ratios=effective_update_ratios(deltas, original, covs, adapter),
        timings=timings,
        context_templates=list(templates),
        keys={layer: torch.cat(ks) for layer, ks in written.items()},
    )


def _solve_state(
    model: nn.Module,
    adapter: Adapter,
    covs: Mapping[int, torch.Tensor],
    config: MemitConfig,
    preserved: Mapping[int, torch.Tensor] | None,
) -> _SolveState:
    """Projectors for AlphaEdit; the preserved K_p K_pᵀ (given, else zeros) when the method keeps it."""
    device = next(model.parameters()).device
    projectors = None
    if config.algorithm == "alphaedit":
        projectors = {
            layer: nullspace_projector(covs[layer].to(device), config.nullspace_threshold, config.nullspace_energy)
            for layer in config.layers
        }
    keep = config.algorithm == "alphaedit" or config.preserve_edits
    if not keep:
        return _SolveState(projectors, None)
    given = preserved or {}
    return _SolveState(
        projectors,
        {
            layer: (
                given[layer].to(device, torch.float64)
                if layer in given
                else torch.zeros(adapter.d_ff, adapter.d_ff, dtype=torch.float64, device=device)
            )
            for layer in config.layers
        },
    )
