"""Guards against poisoned updates, unsafe names and oversized serving requests."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

from editflow import memit
from editflow.config import MemitConfig
from editflow.models import detect_adapter
from editflow.registry.flavor import MAX_NEW_TOKENS, MAX_PROMPTS, check_serving_request
from editflow.registry.promotion import GateThresholds, gate
from editflow.registry.versions import check_model_name
from editflow.requests import EditRequest

CFG = MemitConfig(layers=(1, 2), mom2_update_weight=1.0, v_num_grad_steps=3, context_templates=0, kl_factor=0.0)
REQUESTS = [EditRequest(prompt="alpha {}", subject="gamma delta", target_new="Paris")]


def test_a_non_finite_covariance_stops_the_edit_and_applies_nothing():
    model, tok = tiny_model("gpt2")
    adapter = detect_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    covs = {layer: torch.full((adapter.d_ff, adapter.d_ff), float("nan")) for layer in CFG.layers}
    with pytest.raises(memit.NonFiniteUpdate, match="non-finite entries; nothing was applied"):
        memit.edit(model, tok, adapter, REQUESTS, covs, CFG)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_update_ratios_report_the_raw_and_the_output_scale():
    model, tok = tiny_model("gpt2")
    adapter = detect_adapter(model)
    eye = {layer: torch.eye(adapter.d_ff) for layer in CFG.layers}
    result = memit.edit(model, tok, adapter, REQUESTS, eye, CFG)
    assert set(result.layer_update_ratios) == set(result.deltas) == set(result.layer_output_ratios)
    # With C = I the output ratio is ‖ΔW‖/‖W‖ itself.
    for name, raw in result.layer_update_ratios.items():
        assert result.layer_output_ratios[name] == pytest.approx(raw, rel=1e-6)


def test_gate_fails_a_non_finite_update_and_warns_on_a_large_one():
    assert not gate({"post/max_update_ratio": float("nan")}).passed
    big = gate({"post/max_output_ratio": 3.0}, GateThresholds(warn_output_ratio=1.0))
    assert big.passed and "3× the output" in big.warnings[0]
    assert gate({"post/max_output_ratio": 0.2}).warnings == []


@pytest.mark.parametrize("name", ["it's", "a'b OR name LIKE '%", "x/y", "", "-lead", "tab\tname", "a" * 300])
def test_unsafe_model_names_are_refused(name):
    with pytest.raises(ValueError, match="is not allowed"):
        check_model_name(name)


def test_cli_refuses_a_quoted_name_with_one_error_line(tmp_path, monkeypatch):
    from editflow.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = CliRunner().invoke(main, ["versions", "it's"])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: registered-model name")


def test_serving_limits():
    check_serving_request(["a prompt"], 8)
    from mlflow.exceptions import MlflowException

    for prompts, n in (
        (["x"] * (MAX_PROMPTS + 1), 8),
        (["x"], MAX_NEW_TOKENS + 1),
        (["x"], 0),
        ([], 8),
        (["x" * 10_000], 8),
    ):
        with pytest.raises(MlflowException) as refused:
            check_serving_request(prompts, n)
        assert refused.value.get_http_status_code() == 400
