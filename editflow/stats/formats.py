"""The ``.npz`` layouts of layer statistics: editflow's and the one MEMIT/ROME (and EasyEdit) publish.

editflow: ``sum`` (Σ k kᵀ), ``sum_k``, ``count``, ``mom2`` (= sum / count), ``docs``.
MEMIT (``util.runningstats.CombinedStat(mom2=SecondMoment())``): ``mom2.mom2`` holds Σ k kᵀ (the
raw sum, despite its name) and ``mom2.count`` the token count; Σ k is not kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from editflow.stats.moments import LayerStats

FORMATS = ("editflow", "memit")


def stats_arrays(stats: LayerStats) -> dict[str, np.ndarray]:
    """editflow's arrays for ``stats``."""
    stats.symmetrize()
    return {"sum": stats.sum_kkT.cpu().numpy(), "sum_k": stats.sum_k.cpu().numpy(),
            "count": np.asarray(stats.count, dtype=np.int64), "mom2": stats.mom2().cpu().numpy(),
            "docs": np.asarray(-1 if stats.docs is None else stats.docs, dtype=np.int64)}


def memit_arrays(stats: LayerStats) -> dict[str, np.ndarray]:
    """MEMIT's ``CombinedStat(mom2=SecondMoment())`` state dict for ``stats``."""
    return {"constructor": np.asarray("util.runningstats.CombinedStat()"),
            "mom2.constructor": np.asarray("util.runningstats.SecondMoment()"),
            "mom2.count": np.asarray(stats.count, dtype=np.int64),
            "mom2.mom2": stats.symmetrize().sum_kkT.cpu().numpy()}


def write_npz(target: str | Path | BinaryIO, stats: LayerStats, fmt: str = "editflow") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    arrays = stats_arrays(stats) if fmt == "editflow" else memit_arrays(stats)
    np.savez(target, **arrays)


def detect_format(names: list[str]) -> str:
    if {"sum", "count"} <= set(names):
        return "editflow"
    if {"mom2.mom2", "mom2.count"} <= set(names):
        return "memit"
    raise ValueError(f"not a statistics file: expected sum/count or mom2.mom2/mom2.count, found {sorted(names)}")


def read_npz(path: str | Path) -> tuple[LayerStats, str]:
    """The statistics in ``path`` (either layout) and the layout name."""
    with np.load(path, allow_pickle=False) as data:
        fmt = detect_format(list(data.files))
        if fmt == "editflow":
            sum_kkT, count = data["sum"], int(data["count"])
            sum_k = data["sum_k"] if "sum_k" in data.files else np.full(sum_kkT.shape[0], np.nan, sum_kkT.dtype)
            docs = int(data["docs"]) if "docs" in data.files else -1
        else:
            sum_kkT, count = data["mom2.mom2"], int(data["mom2.count"])
            sum_k, docs = np.full(sum_kkT.shape[0], np.nan, sum_kkT.dtype), -1
    if sum_kkT.ndim != 2 or sum_kkT.shape[0] != sum_kkT.shape[1] or sum_k.shape != (sum_kkT.shape[0],):
        raise ValueError(f"{path}: inconsistent shapes {sum_kkT.shape} and {sum_k.shape}")
    if count <= 0:
        raise ValueError(f"{path}: token count {count} is not positive")
    stats = LayerStats(torch.from_numpy(np.array(sum_kkT)), torch.from_numpy(np.array(sum_k)), count,
                       None if docs < 0 else docs)
    return stats, fmt
