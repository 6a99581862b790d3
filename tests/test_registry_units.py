"""Unit tests of the registry's pure functions: the gate, URI and name parsing, hyperparameter
parsing, the MLflow project's argument normalisation and where the ledger lives. No store needed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import click
import pytest

from editflow.commands._options import parse_hparams
from editflow.registry.ledger import LedgerLocationError, ledger_location
from editflow.registry.promotion import GateThresholds, gate
from editflow.registry.versions import check_model_name, is_not_found, parse_models_uri

ROOT = Path(__file__).resolve().parents[1]


def _entry():
    spec = importlib.util.spec_from_file_location("memit_entry", ROOT / "projects/memit/entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOOD = {
    "post/efficacy": 98.0,
    "pre/neighborhood": 90.0,
    "post/neighborhood": 85.0,
    "pre/heldout": 100.0,
    "post/heldout": 96.0,
    "post/drift_ppl_rel": 0.05,
    "post/drift_ppl": 10.5,
    "post/retention": 95.0,
}
ROOT_FIGURES = {"drift_ppl": 10.0, "heldout": 100.0}


# --------------------------------------------------------------------------- the gate


def test_gate_passes_good_metrics_and_ignores_absent_ones():
    assert gate(GOOD, root=ROOT_FIGURES) == gate(GOOD, root=ROOT_FIGURES)
    result = gate(GOOD, root=ROOT_FIGURES)
    assert result.passed and result.reasons == [] and result.warnings == []
    assert gate({}).passed  # nothing measured: nothing checked


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"post/efficacy": 89.9}, "efficacy 89.9 < 90.0"),
        ({"post/neighborhood": 79.0}, "neighborhood fell 11.0 points (> 10.0)"),
        ({"post/drift_ppl_rel": 0.11}, "held-out perplexity rose 11.0 % (> 10.0 %)"),
        ({"post/retention": 89.0}, "retention of earlier facts 89.0 < 90.0"),
    ],
)
def test_gate_names_each_failing_parent_rule(change, reason):
    result = gate({**GOOD, **change}, root=ROOT_FIGURES)
    assert not result.passed and result.reasons == [reason]


def test_gate_limits_are_inclusive_despite_floating_point_noise():
    """Scores are means × 100: a run logged 84 % of its neighbourhood prompts as 83.99999999999999 after
    94.0, a drop of exactly 10 points, which a "more than 10 points" rule must pass; 10.1 still fails."""
    at_limit = {
        **GOOD,
        "pre/neighborhood": 94.0,
        "post/neighborhood": 83.99999999999999,
        "post/efficacy": 0.9 * 100,
        "post/retention": 0.9 * 100,
        "post/heldout": 100.0 - 10.000000000000014,
    }
    assert 94.0 - at_limit["post/neighborhood"] > 10.0  # the noise is real
    assert gate(at_limit, root=ROOT_FIGURES).passed
    over = gate({**at_limit, "post/neighborhood": 83.9}, root=ROOT_FIGURES)
    assert over.reasons == ["neighborhood fell 10.1 points (> 10.0)"]


def test_cumulative_gate_stops_a_lineage_whose_per_step_drift_passed():
    # +5 % over the parent passes the per-step rule; +15.5 % over the root does not
    step = {**GOOD, "post/drift_ppl_rel": 0.05, "post/drift_ppl": 11.55, "post/heldout": 88.0, "pre/heldout": 92.0}
    result = gate(step, root=ROOT_FIGURES)
    assert not result.passed
    assert result.reasons == [
        "held-out perplexity 15.5 % above the root base's (> 10.0 %)",
        "heldout 12.0 points below the root base's (> 10.0)",
    ]
    assert gate(step).passed  # without the root figures only the parent rules apply


def test_gate_fails_a_non_finite_update_and_warns_on_a_large_one():
    bad = gate({**GOOD, "post/max_update_ratio": math.nan}, root=ROOT_FIGURES)
    assert not bad.passed and bad.reasons == ["the weight update is not finite"]
    loud = gate({**GOOD, "post/max_output_ratio": 3.0}, root=ROOT_FIGURES)
    assert loud.passed and len(loud.warnings) == 1 and "3×" in loud.warnings[0]


def test_measuring_gate_refuses_nothing_measured_but_still_a_non_finite_update():
    awful = {"post/efficacy": 0.0, "pre/heldout": 100.0, "post/heldout": 0.0, "post/drift_ppl_rel": 50.0}
    assert gate(awful, GateThresholds.measuring(), root={"drift_ppl": 1.0, "heldout": 100.0}).passed
    assert not gate({**awful, "post/max_output_ratio": math.inf}, GateThresholds.measuring()).passed


# --------------------------------------------------------------------------- URIs and names


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/editflow-default/3", ("editflow-default", "3")),
        ("models:/editflow-default@production", ("editflow-default", "@production")),
        ("models:/a.b_c+d/12", ("a.b_c+d", "12")),
    ],
)
def test_parse_models_uri(uri, parsed):
    assert parse_models_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["models:/", "models:/x", "models:/x/v2", "runs:/abc/model", "models:/x@", "x/3"])
def test_parse_models_uri_refuses_what_is_not_a_version_reference(uri):
    with pytest.raises(ValueError, match="not a registered-model URI"):
        parse_models_uri(uri)


@pytest.mark.parametrize("name", ["editflow-default", "SmolLM2 135M", "a", "x" * 256])
def test_model_names_editflow_can_register(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "it's", "a/b", "-lead", "x" * 257, "tab\there", 'quote"d', "a%b"])
def test_model_names_refused_before_they_reach_a_search_filter(name):
    with pytest.raises(ValueError, match="is not allowed"):
        check_model_name(name)


def test_only_mlflows_not_found_reads_as_none():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    assert is_not_found(MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_not_found(MlflowException("locked", error_code=INTERNAL_ERROR))
    assert not is_not_found(OSError("database is locked"))


# --------------------------------------------------------------------------- hyperparameters


def test_parse_hparams_forms():
    assert parse_hparams(None) == parse_hparams("  ") == {}
    assert parse_hparams("v_lr=0.3, layers=4-8") == {"v_lr": "0.3", "layers": "4-8"}
    assert parse_hparams("layers=4,5,6;v_lr=1") == {"layers": "4,5,6", "v_lr": "1"}
    assert parse_hparams('{"v_lr": 0.3, "layers": [4, 5]}') == {"v_lr": 0.3, "layers": [4, 5]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("v_lr", "expected key=value, got 'v_lr'"),
        ("layers=4,5,6", "expected key=value, got '5'"),  # commas split pairs: lists need ';'
        ("{nope", "not valid JSON"),
        ("[1, 2]", "expected key=value"),
    ],
)
def test_parse_hparams_errors_name_the_problem(text, message):
    with pytest.raises(click.BadParameter, match=message):
        parse_hparams(text)


# --------------------------------------------------------------------------- the MLflow project entry


def test_entry_normalise_maps_mlflow_strings_onto_cli_options():
    normalise = _entry().normalise
    args = ["edit", "facts.json", "--model", "", "--chunk-size", "100.0", "--stats-tokens", "0", "--seed", "0"]
    assert normalise(args) == ["edit", "facts.json", "--chunk-size", "100", "--seed", "0"]
    assert normalise(["edit", "--fluency", "false", "--promote", "never"]) == [
        "edit",
        "--no-fluency",
        "--promote",
        "never",
    ]
    assert normalise(["edit", "--fluency", "true"]) == ["edit"]
    assert normalise(["edit", "--hparams"]) == ["edit"]  # an empty value MLflow dropped


def test_entry_normalise_refuses_a_fractional_integer_option():
    with pytest.raises(SystemExit, match="--chunk-size must be an integer, got '2.5'"):
        _entry().normalise(["edit", "--chunk-size", "2.5"])


# --------------------------------------------------------------------------- the ledger's location


def test_ledger_lives_in_the_sql_store_else_beside_the_client(tmp_path):
    assert ledger_location("sqlite:////srv/mlflow.db", tmp_path) == "sqlite:////srv/mlflow.db"
    assert ledger_location("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    assert ledger_location(str(tmp_path / "mlruns"), tmp_path) == f"sqlite:///{tmp_path / 'editflow-ledger.db'}"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://user:secret@mlflow.example", "databricks"])
def test_remote_tracking_never_falls_back_to_a_local_ledger(uri, tmp_path):
    with pytest.raises(LedgerLocationError, match="EDITFLOW_LEDGER_URI") as err:
        ledger_location(uri, tmp_path)
    assert "secret" not in str(err.value)
