"""Layer statistics for MEMIT: C_ℓ = E[k kᵀ] of each edited layer's rewrite-module input.

``layer_covariances`` is the entry point: corpus sources (:mod:`.corpus`), the single-pass
multi-layer collector (:mod:`.collect`), and the verified on-disk cache (:mod:`.cache`).
"""

from editflow.stats.api import CovarianceResult, cache_keys, default_max_length, layer_covariances
from editflow.stats.cache import CacheEntry, CacheKey, cache_root, check_entry, iter_entries
from editflow.stats.collect import Start, accumulate_pass, collect
from editflow.stats.corpus import (
    CorpusSpec,
    Sampling,
    bundled_corpus_path,
    corpus_identity,
    iter_documents,
    sample_documents,
)
from editflow.stats.formats import read_npz, write_npz
from editflow.stats.moments import LayerStats

__all__ = [
    "CacheEntry",
    "CacheKey",
    "CorpusSpec",
    "CovarianceResult",
    "LayerStats",
    "Sampling",
    "Start",
    "accumulate_pass",
    "bundled_corpus_path",
    "cache_keys",
    "cache_root",
    "check_entry",
    "collect",
    "corpus_identity",
    "default_max_length",
    "iter_documents",
    "iter_entries",
    "layer_covariances",
    "read_npz",
    "sample_documents",
    "write_npz",
]
