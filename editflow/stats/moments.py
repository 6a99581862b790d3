"""Running uncentred second moments of one layer's keys: the pure math, no I/O, no hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Σ k kᵀ is symmetric: only blocks on and above the diagonal are accumulated (rows in blocks of this
#: size), then mirrored, which saves up to half of the update FLOPs for wide layers.
BLOCK = 1024


def add_upper(acc: torch.Tensor, x: torch.Tensor, block: int = BLOCK) -> None:
    """acc += xᵀx on the block upper triangle only (blocks below the diagonal are left untouched)."""
    d = x.shape[1]
    if d < 2 * block:
        acc.addmm_(x.T, x)
        return
    for i in range(0, d, block):
        acc[i : i + block, i:].addmm_(x[:, i : i + block].T, x[:, i:])


def mirror_upper(acc: torch.Tensor, block: int = BLOCK) -> None:
    """Copy the block upper triangle onto the blocks below the diagonal (in place)."""
    d = acc.shape[0]
    if d < 2 * block:
        return
    for i in range(block, d, block):
        acc[i : i + block, :i].copy_(acc[:i, i : i + block].T)


def stats_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in STATS_DTYPES.values():
            raise ValueError(f"statistics are accumulated in float32 or float64, not {name}")
        return name
    try:
        return STATS_DTYPES[name]
    except KeyError:
        raise ValueError(f"statistics dtype must be one of {sorted(STATS_DTYPES)}, not {name!r}") from None


@dataclass
class LayerStats:
    """Σ k kᵀ, Σ k and the token count over the tokens seen so far.

    ``docs`` is the number of corpus documents (in sampling order) these sums cover, so an estimate
    can be extended with the documents that follow; ``None`` when unknown (imported statistics).
    ``sum_k`` is NaN when unknown (statistics imported from MEMIT's layout keep only Σ k kᵀ).
    """

    sum_kkT: torch.Tensor
    sum_k: torch.Tensor
    count: int = 0
    docs: int | None = 0
    _stale_lower: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "LayerStats":
        return cls(torch.zeros(dim, dim, dtype=dtype, device=device), torch.zeros(dim, dtype=dtype, device=device))

    @property
    def dim(self) -> int:
        return int(self.sum_k.shape[0])

    def add(self, keys: torch.Tensor) -> None:
        """Accumulate the rows of ``keys`` (n × d), cast to the accumulation dtype first."""
        x = keys.reshape(-1, self.dim).to(self.sum_kkT.dtype)
        if x.shape[0] == 0:
            return
        add_upper(self.sum_kkT, x)
        self._stale_lower = True
        self.sum_k.add_(x.sum(0))
        self.count += int(x.shape[0])

    def symmetrize(self) -> "LayerStats":
        """Make ``sum_kkT`` whole after :meth:`add` (which updates only its block upper triangle)."""
        if self._stale_lower:
            mirror_upper(self.sum_kkT)
            self._stale_lower = False
        return self

    def mom2(self) -> torch.Tensor:
        """E[k kᵀ] = Σ k kᵀ / n."""
        if self.count == 0:
            raise ValueError("no tokens accumulated")
        return self.symmetrize().sum_kkT / self.count

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens accumulated")
        return self.sum_k / self.count

    def merge(self, other: "LayerStats") -> "LayerStats":
        """The statistics of both token sets together (``other`` follows ``self`` in the stream)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of width {self.dim} and {other.dim}")
        dtype = torch.promote_types(self.sum_kkT.dtype, other.sum_kkT.dtype)
        a, b = self.symmetrize().to(dtype=dtype), other.symmetrize().to(self.sum_kkT.device, dtype)
        docs = None if a.docs is None or b.docs is None else a.docs + b.docs
        return LayerStats(a.sum_kkT + b.sum_kkT, a.sum_k + b.sum_k, a.count + b.count, docs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LayerStats":
        self.symmetrize()
        return LayerStats(
            self.sum_kkT.to(device=device, dtype=dtype),
            self.sum_k.to(device=device, dtype=dtype),
            self.count,
            self.docs,
        )
