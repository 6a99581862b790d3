"""One forward pass over the corpus collects the key statistics of every requested layer.

A forward pre-hook on each layer's rewrite module accumulates Σ k kᵀ of its input over the
non-padding tokens, and the pass stops at the input of the deepest rewrite module, so no later layer
and no LM head is computed. Batches hold at most ``batch_tokens`` padded tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editflow import nethook
from editflow.models import Adapter
from editflow.progress import bar as progress_bar
from editflow.progress import is_quiet
from editflow.stats.batching import Budget, collate, length_batches, tokenize
from editflow.stats.moments import LayerStats
from editflow.tokens import Batch, pad_id


@dataclass(frozen=True)
class Start:
    """Where a layer's collection resumes: after ``docs`` stream documents holding ``tokens`` tokens."""

    docs: int = 0
    tokens: int = 0


def accumulate_pass(
    model: torch.nn.Module,
    adapter: Adapter,
    layers: Sequence[int],
    batches: Iterable[tuple[Batch, torch.Tensor]],
    dtype: torch.dtype,
    starts: Mapping[int, int] | None = None,
    progress: tqdm | None = None,
) -> dict[int, LayerStats]:
    """Σ k kᵀ per layer over the non-padding tokens of ``batches`` (batch, stream index per row).

    Rows whose stream index is below ``starts[layer]`` are skipped for that layer (the layer already
    holds them from a cached estimate).
    """
    if not layers:
        return {}
    device = next(model.parameters()).device
    stats = {layer: LayerStats.zeros(adapter.d_ff, dtype, device) for layer in layers}
    by_name = {adapter.rewrite(layer): layer for layer in layers}
    starts = dict(starts or {})
    masks: dict[int, torch.Tensor] = {}

    def add(name: str, keys: torch.Tensor) -> None:
        layer = by_name[name]
        stats[layer].add(keys[masks[layer]])
        return None

    with (
        torch.inference_mode(),
        nethook.capture(model, inputs_of=list(by_name), stop_after=adapter.rewrite(max(layers)), transform=add),
    ):
        for batch, index in batches:
            batch, index = batch.to(device), index.to(device)
            valid = batch.attention_mask.bool()
            masks = {
                layer: valid & (index >= starts.get(layer, 0))[:, None] if starts.get(layer, 0) else valid
                for layer in layers
            }
            nethook.run_until_stopped(model, **batch.model_inputs())
            if progress is not None:
                progress.update(int(valid.sum()))
    return stats


def collect(
    model: torch.nn.Module,
    tokenizer: object,
    adapter: Adapter,
    layers: Sequence[int],
    texts: Iterable[str],
    tokens: int,
    max_length: int,
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = 8192,
    starts: Mapping[int, Start] | None = None,
    progress: bool = True,
) -> tuple[dict[int, LayerStats], Budget]:
    """Statistics of ``layers`` over the first ``tokens`` tokens of the document stream ``texts``.

    With ``starts``, a layer only collects the documents after its start (to be merged into the
    cached estimate it already has); the pass begins at the earliest start. Returns the per-layer
    statistics (``docs`` = documents covered) and the budget (where the stream stopped).
    """
    starts = {layer: (starts or {}).get(layer, Start()) for layer in layers}
    first = min(starts.values(), key=lambda s: s.docs) if starts else Start()
    budget = Budget(tokens, taken=first.tokens, docs_end=first.docs)
    docs = budget.take(tokenize(texts, tokenizer, max_length, start=first.docs))
    batches = (collate(group, pad_id(tokenizer)) for group in length_batches(docs, batch_tokens))
    bar = progress_bar(
        total=tokens,
        initial=first.tokens,
        unit="tok",
        unit_scale=True,
        desc="layer stats",
        disable=not progress or is_quiet(),
    )
    with bar:
        stats = accumulate_pass(
            model, adapter, layers, batches, dtype, {layer: s.docs for layer, s in starts.items()}, bar
        )
    for layer, s in starts.items():
        stats[layer].docs = budget.docs_end - s.docs
    return {layer: st.to("cpu") for layer, st in stats.items()}, budget
