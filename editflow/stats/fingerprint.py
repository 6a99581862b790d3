"""Fingerprints of exactly what one layer's statistics depend on: weights and tokenizer.

The keys of layer ℓ (the input of its rewrite module) depend on every parameter outside the block
list (embeddings; the final norm and LM head are included too: harmless and architecture-agnostic),
on blocks 0 … ℓ-1, and on block ℓ except its rewrite module. Blocks after ℓ and the rewrite weight
of ℓ itself are left out, so a model whose MEMIT edit changed only the rewrite weights of layers
≥ ℓ reuses layer ℓ's cached statistics, while any change upstream invalidates them. Every tensor
is hashed once; per-layer fingerprints combine the per-tensor digests.
"""

from __future__ import annotations

import hashlib
import json

import torch

from editflow.hashing import update_with_tensor
from editflow.models import Adapter


def tensor_digests(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every state-dict tensor (name, shape, dtype and bytes)."""
    out = {}
    for name, t in model.state_dict().items():
        h = hashlib.sha256()
        update_with_tensor(h, name, t)
        out[name] = h.hexdigest()
    return out


def layer_dependencies(names: list[str], adapter: Adapter, layer: int) -> list[str]:
    """The state-dict names the statistics of ``layer`` depend on (see the module docstring)."""
    block_root = adapter.layer("").rstrip(".") + "."
    later = tuple(adapter.layer(i) + "." for i in range(layer + 1, adapter.n_layers))
    own = adapter.rewrite(layer) + "."
    return sorted(
        n
        for n in names
        if not n.startswith(later)
        and not n.startswith(own)
        and (not n.startswith(block_root) or _block_index(n, block_root) <= layer)
    )


def _block_index(name: str, block_root: str) -> int:
    head = name[len(block_root) :].split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def combine(digests: dict[str, str], names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


def layer_fingerprints(model: torch.nn.Module, adapter: Adapter, layers: list[int]) -> dict[int, str]:
    """Fingerprint of the weights each layer's statistics depend on."""
    digests = tensor_digests(model)
    return {layer: combine(digests, layer_dependencies(list(digests), adapter, layer)) for layer in layers}


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of all weights (recorded in manifests, not part of the key)."""
    digests = tensor_digests(model)
    return combine(digests, list(digests))


def tokenizer_fingerprint(tokenizer: object) -> str:
    """SHA-256 of the tokenizer's full definition (fast tokenizers) or its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding are call-time settings the backend remembers: leave them out
        definition = json.loads(backend.to_str())
        text = json.dumps({k: v for k, v in definition.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))  # type: ignore[attr-defined]
    extra = json.dumps(
        {"special": getattr(tokenizer, "all_special_tokens", None), "class": type(tokenizer).__name__},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()
