"""Lifelong editing through the registry on a real sqlite store: the edit state a lineage carries,
retention over the lineage's facts, and what a corrupt state does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_workflow import HPARAMS, LOOSE, make_workspace

from editflow import memit
from editflow.config import MemitConfig
from editflow.edit_state import EditStateError
from editflow.pipeline import EditJob, run_edit
from editflow.registry import lineage, promotion
from editflow.registry.store import Registry
from editflow.registry.versions import load_version, versions_of
from editflow.requests import load_requests

ALPHA = {**HPARAMS, "algorithm": "alphaedit", "alphaedit_l2": 0.5, "nullspace_threshold": 1e-6}
SECOND = [
    {"prompt": "the {}", "subject": "kappa lambda mu", "target_new": "violin"},
    {"prompt": "beta {}", "subject": "omega", "target_new": "tennis"},
]
THIRD = [{"prompt": "sigma {}", "subject": "rho", "target_new": "golf"}]  # overwrites a fact of FACTS


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    paths = make_workspace(tmp_path)
    for name, facts in (("second", SECOND), ("third", THIRD)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(facts))
    return paths


def edit(ws, requests: Path, model: str, **kw):
    job = EditJob(
        requests=str(requests),
        model=model,
        corpus=str(ws["corpus"]),
        fluency=False,
        thresholds=LOOSE,
        registered_model="life",
        hparams=kw.pop("hparams", ALPHA),
        promote="always",
        **kw,
    )
    return run_edit(job)


def weights(name: str, version: int, names: list[str]) -> dict[str, torch.Tensor]:
    reg = Registry()
    state = load_version(reg, name, version, device="cpu").handle.model.state_dict()
    return {n: state[n].detach().clone() for n in names}


def state_keys(reg: Registry, name: str, version: int) -> int:
    """Keys in the edit state a version carries (its ``editflow.json``)."""
    return load_version(reg, name, version, device="cpu").handle.extra["editflow"]["edit_state"]["n_keys"]


def test_two_runs_carrying_the_state_equal_one_sequential_run(ws):
    reg = Registry()
    first = edit(ws, ws["facts"], str(ws["model"]))
    second = edit(ws, ws["second"], "models:/life@production")
    assert (first.version, second.version) == (2, 3)
    assert state_keys(reg, "life", 3) == 4

    # The same four facts as one sequential AlphaEdit call of two chunks, on the base, with the same C.
    base = load_version(reg, "life", 1, device="cpu").handle
    covs = {}
    from editflow.stats import CorpusSpec, layer_covariances

    config = MemitConfig(**{**ALPHA, "layers": tuple(ALPHA["layers"])}).replace(mode="sequential", chunk_size=2)
    covs = layer_covariances(
        base, list(config.layers), CorpusSpec(source=str(ws["corpus"])), 1000, dtype=config.mom2_dtype, seed=config.seed
    ).covs
    requests = load_requests(ws["facts"]) + load_requests(ws["second"])
    memit.edit(base.model, base.tokenizer, base.adapter, requests, covs, config, keep_applied=True)
    names = [base.adapter.rewrite_weight(layer) for layer in config.layers]
    got = weights("life", 3, names)
    for n in names:
        want = base.model.state_dict()[n]
        assert torch.allclose(got[n], want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), n


def test_from_zero_forgets_what_the_state_preserves(ws):
    """Without the carried state the second edit sees no earlier keys (today's behaviour before edit states)."""
    reg = Registry()
    edit(ws, ws["facts"], str(ws["model"]))
    stateless = edit(ws, ws["second"], "models:/life@production", carry_state=False)
    assert state_keys(reg, "life", stateless.version) == 2


def test_rollback_then_edit_uses_the_rolled_back_state_and_retention_uses_the_newest_targets(ws):
    reg = Registry()
    edit(ws, ws["facts"], str(ws["model"]))  # v2: gamma delta → Paris, rho → chess
    edit(ws, ws["second"], "models:/life@production")  # v3
    promotion.rollback(reg, "life")  # production back to v2
    out = edit(ws, ws["third"], "models:/life@production")  # v4 on v2: rho → golf
    assert out.parent_version == 2
    assert state_keys(reg, "life", 4) == 3  # v2's two keys + one; not v3's
    held = {r.subject: r.target_new for r in lineage.lineage_requests(reg, "life", 4)}
    assert held == {"gamma delta": "Paris", "rho": "golf"}
    # Retention is measured on the earlier facts the batch does not overwrite: gamma delta only.
    assert out.metrics["post/n_retention"] == 1.0 and out.metrics["post/retention"] == 100.0
    run_metrics = __import__("mlflow").MlflowClient().get_metric_history(out.run_id, "lineage/retention")
    assert [m.step for m in run_metrics] == [4]


def test_corrupt_state_fails_before_editing_and_registers_nothing(ws):
    import mlflow

    reg = Registry()
    first = edit(ws, ws["facts"], str(ws["model"]))
    local = Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="edit_state"))
    stored = Path(mlflow.get_run(first.run_id).info.artifact_uri.removeprefix("file://")) / "edit_state"
    target = stored / "edit_state.safetensors"
    data = bytearray(target.read_bytes())
    data[-2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert local.exists()
    before = len(versions_of(reg, "life"))
    with pytest.raises(EditStateError, match="corrupt"):
        edit(ws, ws["second"], "models:/life@production")
    assert len(versions_of(reg, "life")) == before
    failed = mlflow.search_runs(
        search_all_experiments=True, filter_string="attributes.status = 'FAILED'", output_format="list"
    )
    assert failed and "time/stats" not in failed[0].data.metrics  # it stopped before the statistics


def test_repair_runs_in_the_workflow_and_registers_what_it_evaluated(ws):
    """With ``repair_steps`` the second version is the repaired model: its registered weights are what
    the run evaluated (the version's efficacy re-measured from the store matches the run's), and its
    edit state holds the keys of the repaired model."""
    import mlflow

    from editflow.evaluate import Evaluator

    reg = Registry()
    edit(ws, ws["facts"], str(ws["model"]), hparams=HPARAMS | {"preserve_edits": True})
    hparams = HPARAMS | {"preserve_edits": True, "repair_steps": 3, "repair_lr": 1e-3}
    out = edit(ws, ws["second"], "models:/life@production", hparams=hparams)
    run = mlflow.get_run(out.run_id)
    assert run.data.metrics["time/edit_repair"] > 0 and run.data.params["hp.repair_steps"] == "3"
    plain = edit(ws, ws["second"], "models:/life/2", hparams=HPARAMS | {"preserve_edits": True})
    names = ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    repaired_w, plain_w = weights("life", out.version, names), weights("life", plain.version, names)
    assert any(not torch.equal(repaired_w[n], plain_w[n]) for n in names)
    # The run's evaluator, rebuilt on the parent (whose predictions stand in for the missing true
    # targets), then pointed at the stored version's weights: the figure the run logged.
    parent = load_version(reg, "life", 2, device="cpu").handle
    ev = Evaluator(parent, load_requests(ws["second"]), n_auto_neighbors=0, fluency=False)
    ev.pre()
    memit.set_weights(parent.model, repaired_w)
    post = ev.post().metrics
    assert post["efficacy_magnitude"] == pytest.approx(out.metrics["post/efficacy_magnitude"], abs=1e-4)
    assert post["efficacy_magnitude"] != pytest.approx(plain.metrics["post/efficacy_magnitude"], abs=1e-4)
    assert state_keys(reg, "life", out.version) == 4


def test_repair_replay_rehearses_the_lineage_facts_in_the_workflow(ws):
    """``repair_replay`` reaches the run's repair with the facts the parent's lineage holds: from the
    same parent, the version repaired with it differs from the one repaired without it."""
    edit(ws, ws["facts"], str(ws["model"]), hparams=HPARAMS | {"preserve_edits": True})
    base = HPARAMS | {"preserve_edits": True, "repair_steps": 3, "repair_lr": 1e-3}
    plain = edit(ws, ws["second"], "models:/life/2", hparams=base)
    replayed = edit(ws, ws["second"], "models:/life/2", hparams=base | {"repair_replay": 10.0})
    names = ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    plain_w, replayed_w = weights("life", plain.version, names), weights("life", replayed.version, names)
    assert any(not torch.equal(plain_w[n], replayed_w[n]) for n in names)
    assert replayed.metrics["post/n_retention"] == 2 == plain.metrics["post/n_retention"]
