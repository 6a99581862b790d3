"""The editing state a lineage carries: per edited layer, the keys of every edit made so far.

AlphaEdit's preserved term K_p K_pᵀ (Fang et al. 2025, eq. 7) and MEMIT's sequential setting
(Meng et al. 2023, §3: earlier edits' keys join the keys to preserve) both need, for each edited
layer ℓ, G_ℓ = Σ k kᵀ over the keys k of all earlier edits (d_ff × d_ff). Each edit adds one
template-averaged key per request, so while a lineage holds fewer edits than d_ff the factor
K_p (d_ff × m) is an exact and smaller form of G_ℓ = K_p K_pᵀ; past that the d_ff × d_ff sum is kept.

Pure tensors here; :func:`save_state` / :func:`load_state` are the only I/O (safetensors, with a
SHA-256 that is recorded beside the file and checked on every load).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editflow.hashing import file_sha256
from editflow.stats.moments import STATS_DTYPES as DTYPES  # the accumulator dtypes: float32, float64

STATE_FILE = "edit_state.safetensors"


class EditStateError(ValueError):
    """An edit state that is missing, corrupt, or does not belong to the lineage it is used for."""


@dataclass
class LayerKeys:
    """The keys of one layer: a factor K_p (d_ff × m) or, once m would exceed d_ff, the sum G (d_ff × d_ff)."""

    factor: torch.Tensor | None = None
    gram_sum: torch.Tensor | None = None
    n_keys: int = 0

    def gram(self, d_ff: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """G = K_p K_pᵀ (d_ff × d_ff)."""
        if self.gram_sum is not None:
            return self.gram_sum.to(dtype)
        if self.factor is None:
            return torch.zeros(d_ff, d_ff, dtype=dtype)
        k = self.factor.to(dtype)  # (d_ff, m)
        return k @ k.T

    def add(self, keys: torch.Tensor) -> "LayerKeys":
        """A new :class:`LayerKeys` with ``keys`` (n × d_ff) appended."""
        keys = keys.detach().to("cpu", torch.float64)
        n, d_ff = keys.shape
        m = self.n_keys + n
        if self.gram_sum is None and m <= d_ff:
            old = (
                self.factor.to(torch.float64) if self.factor is not None else torch.zeros(d_ff, 0, dtype=torch.float64)
            )
            return LayerKeys(factor=torch.cat([old, keys.T], dim=1), n_keys=m)  # (d_ff, m)
        return LayerKeys(gram_sum=self.gram(d_ff) + keys.T @ keys, n_keys=m)


@dataclass
class EditState:
    """Per edited layer index, the keys of every edit in the lineage so far."""

    layers: dict[int, LayerKeys] = field(default_factory=dict)

    @property
    def n_keys(self) -> int:
        return max((k.n_keys for k in self.layers.values()), default=0)

    def preserved(self, layers: list[int], d_ff: int) -> dict[int, torch.Tensor]:
        """G_ℓ (float64, d_ff × d_ff) for each of ``layers`` (zeros where the lineage has none)."""
        return {layer: self.layers.get(layer, LayerKeys()).gram(d_ff) for layer in layers}

    def extended(self, new_keys: Mapping[int, torch.Tensor]) -> "EditState":
        """A new state with ``new_keys[layer]`` (n × d_ff) added to each layer."""
        layers = dict(self.layers)
        for layer, keys in new_keys.items():
            layers[layer] = layers.get(layer, LayerKeys()).add(keys)
        return EditState(layers)


def _tensors(state: EditState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for layer, keys in sorted(state.layers.items()):
        if keys.gram_sum is not None:
            out[f"layer.{layer}.gram"] = keys.gram_sum.to(dtype).contiguous()
        elif keys.factor is not None:
            out[f"layer.{layer}.factor"] = keys.factor.to(dtype).contiguous()
    return out


def save_state(
    state: EditState, directory: str | os.PathLike, dtype: str = "float32", parent_sha256: str | None = None
) -> dict:
    """Write ``state`` as ``edit_state.safetensors`` in ``directory``; return its record for editflow.json."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"edit state dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(directory) / STATE_FILE
    tensors = _tensors(state, DTYPES[dtype])
    counts = {f"layer.{layer}.n_keys": str(k.n_keys) for layer, k in state.layers.items()}
    save_file(tensors, str(path), metadata={"parent_sha256": parent_sha256 or "", **counts})
    return {
        "file": STATE_FILE,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "dtype": dtype,
        "layers": sorted(state.layers),
        "n_keys": state.n_keys,
        "parent_sha256": parent_sha256,
    }


def load_state(directory: str | os.PathLike, record: Mapping | None) -> EditState:
    """Read the state a version recorded, checking its SHA-256 first (empty for a version without one)."""
    from safetensors import safe_open

    if not record:
        return EditState()
    path = Path(directory) / record.get("file", STATE_FILE)
    if not path.is_file():
        raise EditStateError(f"edit state {path.name} is missing from the version's artifacts")
    digest = file_sha256(path)
    if digest != record.get("sha256"):
        raise EditStateError(
            f"edit state {path.name} is corrupt: SHA-256 {digest[:16]}… does not match the "
            f"recorded {str(record.get('sha256'))[:16]}…"
        )
    layers: dict[int, LayerKeys] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            _, layer, kind = name.split(".")
            n = int(meta.get(f"layer.{layer}.n_keys", 0))
            t = f.get_tensor(name).to(torch.float64)
            layers[int(layer)] = LayerKeys(factor=t, n_keys=n) if kind == "factor" else LayerKeys(gram_sum=t, n_keys=n)
    for layer, keys in layers.items():
        if not torch.isfinite(keys.factor if keys.factor is not None else keys.gram_sum).all():
            raise EditStateError(f"edit state of layer {layer} is not finite")
    return EditState(layers)
