"""Behaviour pinned on the bundled model: the same inputs give the same deltas.

These were first pinned as SHA-256 digests of the delta bits, computed with the code before the
real-model, lifelong and restructuring work (commit 9f900bf) for its two paths (MEMIT batch,
AlphaEdit batch), plus MEMIT sequential with preserved earlier keys. Bits are not portable across
CPUs (an AMD EPYC machine gives other digests for the very same code, c0d875a included), so each
delta is now pinned by four numbers (:func:`summary`), taken from that code on such a machine, to a
tolerance of 1e-4 of its norm (:data:`RTOL`): another CPU moves them by up to 1.1e-5, a small engine
change by 1e-2 or more (CPU, torch 2.13).
"""

from __future__ import annotations

import json

import pytest
import torch

from editflow import assets, memit
from editflow.config import default_config
from editflow.models import default_device, load_model
from editflow.requests import parse_requests
from editflow.stats import CorpusSpec, layer_covariances

PINNED = {
    ("memit", "batch"): {
        "transformer.h.0.mlp.c_proj.weight": (8.755130585993, -0.4466153247049, -11.76186590497, -7.954134977282),
        "transformer.h.1.mlp.c_proj.weight": (59.52231704114, 6.188049865603, 38.65007879835, 6.443945336833),
        "transformer.h.2.mlp.c_proj.weight": (86234.36132786, -16338.76131081, -166427.4472779, 20200.72548744),
    },
    ("alphaedit", "batch"): {
        "transformer.h.0.mlp.c_proj.weight": (11.31294280805, -0.02888097693358, -20.96110547775, 1.971244126058),
        "transformer.h.1.mlp.c_proj.weight": (13.08732746025, 4.514200369253, -10.32181956812, 2.176175620282),
        "transformer.h.2.mlp.c_proj.weight": (13.2896940969, 3.004683074656, -18.09707039684, 8.217061753839),
    },
    ("memit", "sequential"): {
        "transformer.h.0.mlp.c_proj.weight": (9.058533388519, 0.09502119387616, -14.14078395324, -9.486018275961),
        "transformer.h.1.mlp.c_proj.weight": (67.10537234669, -10.20579743637, 80.57122282219, 16.07062552519),
        "transformer.h.2.mlp.c_proj.weight": (72401.97872265, -4824.019368793, -142601.3295048, 22752.59116211),
    },
}

pytestmark = pytest.mark.skipif(default_device() != "cpu", reason="pinned on CPU arithmetic")


#: The bundled model's edit defaults when these were pinned (its shipped defaults have changed since;
#: the pins are of the engine, not of the defaults).
PINNED_HPARAMS = {
    "layers": [0, 1, 2],
    "mom2_update_weight": 100.0,
    "v_num_grad_steps": 50,
    "v_lr": 1.0,
    "clamp_norm_factor": 4.0,
    "kl_factor": 0.0625,
    "v_early_stop_loss": 0.01,
}

#: Tolerance, relative to each delta's norm. Summation order (one against two threads) moves these
#: by about 1e-13, but another CPU's float32 kernels move them by up to 1.1e-5 (measured on a second
#: AMD EPYC machine, same packages: 50 target steps and near-singular covariances at layers 1-2
#: amplify rounding). The smallest engine change measured, KL weight 0.0625 -> 0.07, moves them by
#: 1.4e-2 to 5.6e-2.
RTOL = 1e-4


def summary(delta: torch.Tensor) -> tuple[float, float, float, float]:
    """‖Δ‖, ΣΔ and ⟨Δ, R⟩ for two seeded Gaussian R: four numbers that move with any change of Δ."""
    t = delta.detach().cpu().double()
    gen = torch.Generator().manual_seed(0)
    r1, r2 = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    return float(t.norm()), float(t.sum()), float((t * r1).sum()), float((t * r2).sum())


def test_deltas_are_bit_identical_to_the_pinned_ones(tmp_path):
    handle = load_model(assets.default_model_dir(), device="cpu")
    requests = parse_requests(json.loads(assets.counterfact_records_path().read_text())[:6])
    config = default_config(handle.adapter.model_type, handle.adapter.n_layers, PINNED_HPARAMS)
    covs = layer_covariances(
        handle, list(config.layers), CorpusSpec("bundled"), 20000, progress=False, cache_dir=tmp_path
    ).covs
    variants = {
        ("memit", "batch"): config,
        ("alphaedit", "batch"): config.replace(algorithm="alphaedit", nullspace_threshold=0.3),
        ("memit", "sequential"): config.replace(mode="sequential", chunk_size=3, preserve_edits=True),
    }
    for key, config in variants.items():
        deltas = memit.edit(handle.model, handle.tokenizer, handle.adapter, requests, covs, config).deltas
        assert sorted(deltas) == sorted(PINNED[key]), key
        for name, pinned in PINNED[key].items():
            got = summary(deltas[name])
            assert got == pytest.approx(pinned, rel=0, abs=RTOL * pinned[0]), (key, name)
