"""What one edit run shows in MLflow and to a script: experiment, run name, dataset, failure record,
exit status and --json."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_workflow import HPARAMS, LOOSE, make_workspace

from editflow.cli import main as cli
from editflow.pipeline import EditJob, experiment_name, run_edit


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    paths = make_workspace(tmp_path)
    paths["uri"] = uri
    return paths


def client(ws):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=ws["uri"], registry_uri=ws["uri"])


def test_experiment_follows_the_registered_model():
    assert experiment_name(EditJob(requests="f.json")) == "editflow-default"
    assert experiment_name(EditJob(requests="f.json", model="models:/team-model@production")) == "team-model"
    assert (
        experiment_name(EditJob(requests="f.json", model="/m/SmolLM2-135M.Q4_1.gguf")) == "editflow-smollm2-135m.q4_1"
    )
    assert experiment_name(EditJob(requests="f.json", model="gpt2", registered_model="mine")) == "mine"


def test_run_is_named_logs_its_dataset_and_no_empty_params(ws):
    out = run_edit(
        EditJob(
            requests=str(ws["facts"]),
            model=str(ws["model"]),
            corpus=str(ws["corpus"]),
            fluency=False,
            thresholds=LOOSE,
            registered_model="named",
            promote="always",
        )
    )
    run = client(ws).get_run(out.run_id)
    assert run.info.run_name == "edit 2 facts → named v2 (production)"
    assert client(ws).get_experiment(run.info.experiment_id).name == "named"
    inputs = run.inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["facts.json"] and inputs[0].dataset.digest
    assert "" not in run.data.params.values()


def test_failed_run_keeps_its_error_and_traceback(ws, tmp_path):
    bad = tmp_path / "bad-hparams.json"
    bad.write_text(json.dumps([{"prompt": "alpha {}", "subject": "rho", "target_new": "Paris"}]))
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        run_edit(
            EditJob(
                requests=str(bad),
                model=str(ws["model"]),
                corpus=str(ws["corpus"]),
                fluency=False,
                registered_model="failing",
                hparams={**HPARAMS, "no_such_knob": 1},
            )
        )
    runs = client(ws).search_runs(
        [e.experiment_id for e in client(ws).search_experiments()], filter_string="attributes.status = 'FAILED'"
    )
    assert len(runs) == 1 and "unknown hyperparameter" in runs[0].data.tags["editflow.error"]
    traceback = client(ws).download_artifacts(runs[0].info.run_id, "error/traceback.txt", str(tmp_path))
    assert "Traceback" in open(traceback).read()


def test_bad_hparams_on_an_empty_store_register_nothing(ws, tmp_path):
    """The first edit of a new store registers the default model; a bad override fails before that."""
    facts = tmp_path / "one.json"
    facts.write_text(json.dumps([{"prompt": "{} plays", "subject": "rho", "target_new": "Paris"}]))
    result = CliRunner().invoke(cli, ["edit", str(facts), "--hparams", "repair_kl=-1", "--no-fluency"])
    assert result.exit_code == 1 and "repair_kl" in result.output
    assert client(ws).search_registered_models() == []


def test_cli_exit_status_says_whether_the_gate_passed(ws):
    runner = CliRunner()
    common = [
        "edit",
        str(ws["facts"]),
        "--model",
        str(ws["model"]),
        "--corpus",
        str(ws["corpus"]),
        "--no-fluency",
        "--registered-model",
        "gated",
        "--json",
        "--max-ppl-increase",
        "100",
        "--max-ppl-increase-root",
        "100",
    ]
    strict = runner.invoke(cli, [*common, "--min-efficacy", "101"])
    assert strict.exit_code == 3, strict.output
    doc = json.loads(strict.stdout)
    assert doc["version"] == 2 and doc["promoted"] is False and not doc["gate"]["passed"]
    assert any("efficacy" in reason for reason in doc["gate"]["reasons"])
    version = client(ws).get_model_version("gated", "2")  # the decision is on the version, beside its alias
    assert version.tags["editflow.gate"].startswith("failed: efficacy")
    assert version.description.startswith("Gate failed: efficacy") and "kept as a candidate" in version.description
    loose = runner.invoke(
        cli,
        [
            *common,
            "--min-efficacy",
            "0",
            "--max-specificity-drop",
            "100",
            "--max-specificity-drop-root",
            "100",
            "--min-retention",
            "0",
        ],
    )
    assert loose.exit_code == 0, loose.output
    assert json.loads(loose.stdout)["promoted"] is True
