"""Behaviour pinned on the bundled model: the same inputs give bit-identical deltas.

The digests were computed with the code as it was before the real-model, lifelong and restructuring
work (commit 9f900bf) for the two paths it had (MEMIT batch, AlphaEdit batch), and are equal now;
the third pins MEMIT sequential with preserved earlier keys, new in this work. A change to the
engine that moves any bit fails here (CPU, torch 2.13, one thread).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from editflow import assets, memit
from editflow.config import default_config
from editflow.models import default_device, load_model
from editflow.requests import parse_requests
from editflow.stats import CorpusSpec, layer_covariances

PINNED = {
    ("memit", "batch"): "f2bcb76c176d4166b93383f27e33dc1dbea42e3451ec31cdb563ff0f84890f1d",
    ("alphaedit", "batch"): "18e3568eb948dd8ba752312b1ba2995969d3007869a155f38f6f3d5f644b5b06",
    ("memit", "sequential"): "de17f06d46c627ba2b54cb12a5c1abf58e1522e7b23558724a19894710c45a2a",
}

pytestmark = pytest.mark.skipif(default_device() != "cpu", reason="digests are of CPU arithmetic")


def digest(deltas: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(deltas):
        h.update(deltas[name].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def test_deltas_are_bit_identical_to_the_pinned_ones(tmp_path):
    handle = load_model(assets.default_model_dir(), device="cpu")
    requests = parse_requests(json.loads(assets.counterfact_records_path().read_text())[:6])
    config = default_config(
        handle.adapter.model_type, handle.adapter.n_layers, handle.extra["model_defaults"].get("hparams", {})
    )
    covs = layer_covariances(
        handle, list(config.layers), CorpusSpec("bundled"), 20000, progress=False, cache_dir=tmp_path
    ).covs
    variants = {
        ("memit", "batch"): config,
        ("alphaedit", "batch"): config.replace(algorithm="alphaedit", nullspace_threshold=0.3),
        ("memit", "sequential"): config.replace(mode="sequential", chunk_size=3, preserve_edits=True),
    }
    got = {
        k: digest(memit.edit(handle.model, handle.tokenizer, handle.adapter, requests, covs, c).deltas)
        for k, c in variants.items()
    }
    assert got == PINNED
