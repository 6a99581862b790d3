"""``layer_covariances``: cached C_ℓ = E[k kᵀ] for the MEMIT layers of a model, computed in one pass.

Cached layers are loaded; every missing layer is computed in a single forward pass over the corpus.
A cached estimate of the same key over fewer tokens is extended with the documents that follow
instead of being recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editflow.models import ModelHandle
from editflow.stats import cache as cache_mod
from editflow.stats.batching import Budget, tokenize
from editflow.stats.cache import CacheEntry, CacheKey
from editflow.stats.collect import Start, collect
from editflow.stats.corpus import CorpusSpec, Sampling, corpus_identity, sample_documents
from editflow.stats.fingerprint import combine, layer_dependencies, tensor_digests, tokenizer_fingerprint
from editflow.stats.moments import LayerStats, stats_dtype
from editflow.stats.sanity import check_covariance
from editflow.tokens import model_positions

#: Documents longer than this are truncated unless ``max_length`` says otherwise.
MAX_LENGTH_CAP = 1024
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_SHUFFLE_BUFFER = 1000


@dataclass
class CovarianceResult:
    """Per-layer E[k kᵀ] (CPU) and the cache entries they came from (``hit`` = reused)."""

    covs: dict[int, torch.Tensor]
    entries: list[CacheEntry]
    stats: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def computed(self) -> list[CacheEntry]:
        return [e for e in self.entries if not e.hit]


def default_max_length(model: torch.nn.Module, tokenizer: object | None = None, cap: int = MAX_LENGTH_CAP) -> int:
    """min(model context, tokenizer limit, ``cap``): never the raw maximum of long-context models."""
    limits = [model_positions(model), getattr(tokenizer, "model_max_length", None)]
    return min([cap, *(int(x) for x in limits if isinstance(x, int) and 0 < x < 10**8)])


def model_dtype(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def cache_keys(
    handle: ModelHandle,
    layers: Sequence[int],
    corpus: CorpusSpec,
    tokens: int,
    max_length: int,
    dtype: str,
    sampling: Sampling,
) -> dict[int, CacheKey]:
    """The cache key of each layer (hashes the weights once, and every local corpus file)."""
    digests = tensor_digests(handle.model)
    names = list(digests)
    common = dict(
        tokenizer=tokenizer_fingerprint(handle.tokenizer),
        corpus=corpus_identity(corpus),
        tokens=int(tokens),
        max_length=int(max_length),
        model_dtype=model_dtype(handle.model),
        stats_dtype=dtype,
        sampling=sampling.key(),
    )
    return {
        layer: CacheKey(
            weights=combine(digests, layer_dependencies(names, handle.adapter, layer)),
            module=handle.adapter.rewrite(layer),
            layer=layer,
            **common,
        )  # type: ignore[arg-type]
        for layer in layers
    }


def _check_layers(handle: ModelHandle, layers: Sequence[int]) -> list[int]:
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < handle.adapter.n_layers]
    if not out or bad:
        raise ValueError(f"layers must be in 0..{handle.adapter.n_layers - 1}; got {list(layers)}")
    return out


def layer_covariances(
    handle: ModelHandle,
    layers: Sequence[int],
    corpus: CorpusSpec,
    tokens: int,
    max_length: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> CovarianceResult:
    """E[k kᵀ] of the rewrite-module input of each layer over ``tokens`` corpus tokens, cached on disk."""
    layers = _check_layers(handle, layers)
    if tokens <= 0:
        raise ValueError("tokens must be positive")
    acc_dtype = stats_dtype(dtype)
    max_length = int(max_length or default_max_length(handle.model, handle.tokenizer))
    sampling = Sampling(seed=seed, shuffle_buffer=shuffle_buffer)
    root = cache_mod.cache_root(cache_dir)
    keys = cache_keys(handle, layers, corpus, tokens, max_length, dtype, sampling)

    cache_mod.remove_stale_temp_files(root)  # what a killed writer left
    found = {layer: cache_mod.read_entry(root, key, report=False) for layer, key in keys.items()}
    missing = [layer for layer, hit in found.items() if hit is None]
    if missing:
        with cache_mod.locked(root, [keys[layer] for layer in missing]):
            for layer in missing:  # another process may have written it meanwhile
                found[layer] = cache_mod.read_entry(root, keys[layer])
            missing = [layer for layer in missing if found[layer] is None]
            if missing:
                found.update(
                    _compute(
                        handle,
                        root,
                        {layer: keys[layer] for layer in missing},
                        corpus,
                        sampling,
                        max_length,
                        acc_dtype,
                        batch_tokens,
                        progress,
                    )
                )
    stats = {layer: found[layer][0] for layer in layers}  # type: ignore[index]
    return CovarianceResult(
        covs={layer: s.mom2().to(acc_dtype).cpu() for layer, s in stats.items()},
        entries=[found[layer][1] for layer in layers],
        stats=stats,
    )  # type: ignore[index]


def corpus_tokens(corpus: CorpusSpec, sampling: Sampling, tokenizer: object, budget: int, max_length: int) -> int:
    """Tokens the corpus gives under ``budget`` (the budget itself when it holds at least that many):
    the tokenisation the pass will do, without the model."""
    counter = Budget(budget)
    for _ in counter.take(tokenize(sample_documents(corpus, sampling), tokenizer, max_length)):
        pass
    return counter.taken


def warn_if_short(corpus: CorpusSpec, sampling: Sampling, tokenizer: object, budget: int, max_length: int) -> None:
    """Say before the pass, not after it, when the corpus holds fewer tokens than the budget."""
    from editflow import progress

    held = corpus_tokens(corpus, sampling, tokenizer, budget, max_length)
    if held < budget:
        progress.note(
            f"editflow: the statistics corpus {corpus.source!r} holds {held:,} tokens for this "
            f"tokenizer, fewer than the budget of {budget:,}; the statistics will use {held:,} "
            "(pass --stats-tokens, or a larger --corpus)"
        )


def _compute(
    handle: ModelHandle,
    root: Path,
    keys: dict[int, CacheKey],
    corpus: CorpusSpec,
    sampling: Sampling,
    max_length: int,
    dtype: torch.dtype,
    batch_tokens: int,
    progress: bool,
) -> dict[int, tuple[LayerStats, CacheEntry]]:
    """Compute (or extend cached prefixes of) the given layers in one pass and store them."""
    prefixes = {layer: cache_mod.find_prefix(root, key) for layer, key in keys.items()}
    starts = {layer: Start(p[0].docs, p[0].count) for layer, p in prefixes.items() if p is not None}
    tokens = next(iter(keys.values())).tokens
    if progress:
        warn_if_short(corpus, sampling, handle.tokenizer, tokens, max_length)
    fresh, budget = collect(
        handle.model,
        handle.tokenizer,
        handle.adapter,
        list(keys),
        sample_documents(corpus, sampling),
        tokens,
        max_length,
        dtype,
        batch_tokens,
        starts,
        progress,
    )
    if budget.exhausted:
        import warnings

        warnings.warn(
            f"corpus exhausted after {budget.taken} tokens (< {tokens} requested)", RuntimeWarning, stacklevel=3
        )
    merged = {
        layer: prefixes[layer][0].merge(fresh[layer]) if prefixes[layer] is not None else fresh[layer] for layer in keys
    }
    for layer, stats in merged.items():  # every layer is checked before any is written
        check_covariance(stats.mom2(), layer, "computed, not written to the cache")
    out = {}
    for layer, key in keys.items():
        prefix = prefixes[layer]
        info = {"model": {"source": handle.source}, "exhausted": budget.exhausted}
        if prefix is not None:
            info.update(source="extended", extended_from=prefix[1].key)
        entry = cache_mod.write_entry(root, key, merged[layer].to(dtype=dtype), info, checked=True)
        out[layer] = (merged[layer], entry)
    return out
