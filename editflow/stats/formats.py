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
    return {
        "sum": stats.sum_kkT.cpu().numpy(),
        "sum_k": stats.sum_k.cpu().numpy(),
        "count": np.asarray(stats.count, dtype=np.int64),
        "mom2": stats.mom2().cpu().numpy(),
        "docs": np.asarray(-1 if stats.docs is None else stats.docs, dtype=np.int64),
    }


def memit_arrays(stats: LayerStats) -> dict[str, np.ndarray]:
    """MEMIT's ``CombinedStat(mom2=SecondMoment())`` state dict for ``stats``."""
    return {
        "constructor": np.asarray("util.runningstats.CombinedStat()"),
        "mom2.constructor": np.asarray("util.runningstats.SecondMoment()"),
        "mom2.count": np.asarray(stats.count, dtype=np.int64),
        "mom2.mom2": stats.symmetrize().sum_kkT.cpu().numpy(),
    }


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


class StatsFileError(ValueError):
    """A statistics file cannot be read: not an npz, pickled objects, missing or non-numeric arrays."""


def _open_npz(path: str | Path):
    """``np.load`` of an npz without unpickling anything, with a :class:`StatsFileError` otherwise."""
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise StatsFileError(
                f"{path}: not an npz archive of arrays (numpy would have to unpickle it, which "
                "editflow never does); save statistics with numpy.savez"
            ) from None
        raise StatsFileError(f"{path}: not an npz file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise StatsFileError(f"{path}: not a readable npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise StatsFileError(f"{path}: a single .npy array, not an npz of statistics")
    return data


def _array(data, name: str, path: str | Path) -> np.ndarray:
    """One array of an open npz; pickled (object) or non-numeric arrays are refused."""
    try:
        value = data[name]
    except ValueError as exc:
        raise StatsFileError(
            f"{path}: array {name!r} holds pickled Python objects ({exc}); editflow never unpickles statistics"
        ) from None
    except (OSError, EOFError, KeyError) as exc:
        raise StatsFileError(f"{path}: array {name!r} cannot be read ({exc})") from None
    if value.dtype.kind not in "biuf":
        raise StatsFileError(f"{path}: array {name!r} has dtype {value.dtype}, not a number")
    return value


def _scalar(data, name: str, path: str | Path) -> int:
    value = _array(data, name, path)
    if value.size != 1:
        raise StatsFileError(f"{path}: array {name!r} must be a single number, has shape {value.shape}")
    return int(value.reshape(()))


def read_npz(path: str | Path) -> tuple[LayerStats, str]:
    """The statistics in ``path`` (either layout) and the layout name."""
    with _open_npz(path) as data:
        try:
            fmt = detect_format(list(data.files))
        except ValueError as exc:
            raise StatsFileError(f"{path}: {exc}") from None
        if fmt == "editflow":
            sum_kkT, count = _array(data, "sum", path), _scalar(data, "count", path)
            sum_k = (
                _array(data, "sum_k", path)
                if "sum_k" in data.files
                else np.full(sum_kkT.shape[0] if sum_kkT.ndim else 0, np.nan)
            )
            docs = _scalar(data, "docs", path) if "docs" in data.files else -1
        else:
            sum_kkT, count = _array(data, "mom2.mom2", path), _scalar(data, "mom2.count", path)
            sum_k, docs = np.full(sum_kkT.shape[0] if sum_kkT.ndim else 0, np.nan), -1
    if sum_kkT.dtype.kind != "f":
        sum_kkT = sum_kkT.astype(np.float64)
    if sum_k.dtype != sum_kkT.dtype:
        sum_k = sum_k.astype(sum_kkT.dtype)
    if sum_kkT.ndim != 2 or sum_kkT.shape[0] != sum_kkT.shape[1] or sum_k.shape != (sum_kkT.shape[0],):
        raise StatsFileError(f"{path}: inconsistent shapes {sum_kkT.shape} and {sum_k.shape}")
    if count <= 0:
        raise StatsFileError(f"{path}: token count {count} is not positive")
    stats = LayerStats(
        torch.from_numpy(np.array(sum_kkT)), torch.from_numpy(np.array(sum_k)), count, None if docs < 0 else docs
    )
    return stats, fmt
