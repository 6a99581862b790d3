"""The production alias moved outside editflow (the MLflow UI, another client) is the truth for what
serves: editflow adopts it into the ledger's history at its next production move, so the stage
follows and a plain rollback returns to the version that served before it. Real sqlite store; the
move is the MLflow API call the UI makes."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import tiny_model

from editflow.cli import main as cli
from editflow.registry import ledger, promotion
from editflow.registry.resolve import ensure_registered_base, resolve_base
from editflow.registry.schema import PRODUCTION
from editflow.registry.store import Registry
from editflow.registry.versions import aliases_of

NAME = "moved"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """Three base versions of one registered model (v1 production, editflow's own promotion)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    reg = Registry()
    for seed in range(3):
        model, tok = tiny_model("gpt2", seed=seed)
        folder = tmp_path / f"m{seed}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        ensure_registered_base(reg, resolve_base(reg, str(folder), device="cpu"), NAME)
    assert aliases_of(reg, NAME)[PRODUCTION] == 1
    return reg


def _stages(reg: Registry) -> dict[int, str]:
    return {int(v.version): v.current_stage for v in reg.client.search_model_versions(f"name='{NAME}'")}


def test_rollback_after_the_alias_was_moved_in_the_ui(store):
    reg = store
    promotion.promote(reg, NAME, 2)
    reg.client.set_registered_model_alias(NAME, PRODUCTION, "3")  # what the MLflow UI does
    assert _stages(reg)[3] != "Production"  # the UI moved the alias only: stage and ledger out of step

    result = CliRunner().invoke(cli, ["rollback", NAME, "--json"])
    assert result.exit_code == 0, result.output
    assert aliases_of(reg, NAME)[PRODUCTION] == 2  # back to what served before the outside move
    moves = [(e.action, e.version, e.previous_version, e.reason) for e in ledger.events(reg, NAME)]
    assert moves[-2:] == [
        ("promote", 3, 2, promotion.EXTERNAL_MOVE),
        ("rollback", 2, 3, "rollback"),
    ]
    assert ledger.production_history(reg, NAME) == [1, 2]
    assert _stages(reg)[2] == "Production" and _stages(reg)[3] == "Archived"


def test_the_adopted_move_is_recorded_once_and_a_promotion_follows_it(store):
    reg = store
    reg.client.set_registered_model_alias(NAME, PRODUCTION, "3")
    assert promotion.reconcile(reg, NAME) == ("recorded the production alias moved outside editflow: version 1 → 3")
    assert _stages(reg)[3] == "Production"
    assert promotion.reconcile(reg, NAME) is None  # in step now: nothing more to record
    assert promotion.promote(reg, NAME, 2)["previous"] == 3
    assert ledger.production_history(reg, NAME) == [1, 3, 2]
    assert [e.reason for e in ledger.events(reg, NAME)].count(promotion.EXTERNAL_MOVE) == 1


def test_a_removed_alias_is_left_removed(store):
    reg = store
    reg.client.delete_registered_model_alias(NAME, PRODUCTION)
    assert promotion.reconcile(reg, NAME) is None
    assert PRODUCTION not in aliases_of(reg, NAME)
    assert ledger.production_history(reg, NAME) == [1]


def test_repair_adopts_the_moved_alias(store):
    reg = store
    reg.client.set_registered_model_alias(NAME, PRODUCTION, "2")
    result = CliRunner().invoke(cli, ["verify", NAME, "--repair"])
    assert result.exit_code == 0, result.output
    assert "recorded the production alias moved outside editflow: version 1 → 2" in result.output
    assert ledger.production_history(reg, NAME) == [1, 2]
