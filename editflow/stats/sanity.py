"""Sanity of a second-moment matrix C = E[k kᵀ]: finite, symmetric and positive semi-definite.

A C that fails any of these would make MEMIT's solve meaningless, so it is refused wherever one
enters or leaves the cache (compute, import, verify, use). Pure functions, no I/O.
"""

from __future__ import annotations

import torch

#: Relative tolerances: |C - Cᵀ| ≤ SYMMETRY_TOL · max|C|, and λ_min ≥ -PSD_TOL · λ_max. Float32
#: estimates of rank-deficient C measure λ_min/λ_max ≈ -1e-7 (the default model, 500 tokens).
SYMMETRY_TOL = 1e-5
PSD_TOL = 1e-5
#: Widths up to this get an exact smallest eigenvalue in the message when the PSD test fails.
EXACT_EIGEN_MAX_DIM = 4096


class CovarianceError(ValueError):
    """A layer's statistics are not a usable second-moment matrix."""


def _largest_eigenvalue(c: torch.Tensor, steps: int = 30) -> float:
    """A power-iteration estimate of λ_max (never below the largest diagonal entry)."""
    v = torch.ones(c.shape[0], dtype=c.dtype, device=c.device) / c.shape[0] ** 0.5
    estimate = 0.0
    for _ in range(steps):
        w = c @ v
        norm = float(w.norm())
        if norm == 0.0:
            break
        estimate, v = float(v @ w), w / norm
    return max(estimate, float(c.diagonal().max()))


def _psd_problem(c: torch.Tensor, tol: float) -> str | None:
    """Why ``c`` (symmetric, finite) is not PSD within ``tol``, or ``None``: one Cholesky factorisation
    of C + tol * lambda_max * I (a third of the cost of an eigendecomposition)."""
    scale = _largest_eigenvalue(c)
    if scale < 0:
        return f"not positive semi-definite (largest diagonal/eigenvalue estimate {scale:.3g} < 0)"
    shift = tol * scale if scale > 0 else tol
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    if int(torch.linalg.cholesky_ex(c + shift * eye).info) == 0:
        return None
    if c.shape[0] <= EXACT_EIGEN_MAX_DIM:
        low = float(torch.linalg.eigvalsh(c)[0])
        return f"not positive semi-definite: smallest eigenvalue {low:.4g} < -{tol:g} x largest eigenvalue {scale:.4g}"
    return f"not positive semi-definite: C + {tol:g} * lambda_max * I has no Cholesky factor (lambda_max ~ {scale:.4g})"


def covariance_problems(cov: torch.Tensor, symmetry_tol: float = SYMMETRY_TOL, psd_tol: float = PSD_TOL) -> list[str]:
    """What is wrong with ``cov`` as a second-moment matrix (empty when it is fine)."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        return [f"not a square matrix (shape {tuple(cov.shape)})"]
    if not cov.is_floating_point():
        return [f"not a floating-point matrix ({cov.dtype})"]
    finite = torch.isfinite(cov)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        return [f"not finite ({bad} of {cov.numel()} entries are NaN or infinite)"]
    # float64 up to EXACT_EIGEN_MAX_DIM; wider matrices (GPT-J's 16,384) are checked in float32, whose
    # rounding (~1e-7) is far below PSD_TOL, at half the time and memory
    c = cov.detach().to(torch.float64 if cov.shape[0] <= EXACT_EIGEN_MAX_DIM else torch.float32)
    magnitude = float(c.abs().max()) if c.numel() else 0.0
    asym = float((c - c.T).abs().max()) if c.numel() else 0.0
    if asym > symmetry_tol * magnitude:
        return [f"not symmetric (max |C - C^T| = {asym:.3g}, {asym / magnitude:.3g} of max |C|)"]
    problem = _psd_problem(c, psd_tol) if c.numel() else None
    return [problem] if problem else []


def check_covariance(cov: torch.Tensor, layer: int | str, source: str = "") -> None:
    """Raise :class:`CovarianceError` naming ``layer`` (and ``source``) when ``cov`` is unusable."""
    problems = covariance_problems(cov)
    if problems:
        where = f" ({source})" if source else ""
        raise CovarianceError(f"layer {layer} statistics{where}: covariance is {'; '.join(problems)}")
