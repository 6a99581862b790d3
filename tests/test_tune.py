"""``editflow tune`` on a tiny model with a real sqlite MLflow store: split, search, time box, MLflow run
structure, the stored result, and that a failed tune registers nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_model

from editflow.cli import main
from editflow.config import MemitConfig
from editflow.registry.store import Registry
from editflow.requests import parse_requests
from editflow.trace import BUCKETS, TraceSummary, best_window
from editflow.tune import (
    SearchSpace,
    Trial,
    TuneError,
    candidate_windows,
    covariance_layers,
    next_trial,
    objective,
    search,
    search_axes,
    split_requests,
    tuned_values,
)

HPARAMS = {
    "layers": [1, 2],
    "mom2_update_weight": 0.5,
    "v_num_grad_steps": 10,
    "clamp_norm_factor": 50.0,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "context_templates": 0,
}
SUBJECTS = ["alpha", "beta gamma", "delta", "epsilon zeta", "eta", "theta iota", "kappa", "mu nu"]
TARGETS = [
    ("Paris", "London"),
    ("chess", "golf"),
    ("Rome", "Berlin"),
    ("piano", "violin"),
    ("red", "blue"),
    ("tennis", "football"),
    ("Madrid", "Paris"),
    ("green", "red"),
]
RECORDS = [
    {
        "prompt": "The {} is",
        "subject": s,
        "target_new": new,
        "target_true": true,
        "paraphrase_prompts": [f"I {s} is"],
        "neighborhood_prompts": ["The omega is"],
    }
    for s, (new, true) in zip(SUBJECTS, TARGETS)
]


# --------------------------------------------------------------------------- pure parts


def test_split_is_seeded_and_disjoint() -> None:
    reqs = parse_requests([{**r, "subject": f"{r['subject']} {i}"} for i in range(3) for r in RECORDS])  # 24
    a = split_requests(reqs, 5, seed=1)
    assert len(a.tuning) == len(a.validation) == 5
    assert not {r.subject for r in a.tuning} & {r.subject for r in a.validation}
    assert a == split_requests(reqs, 5, seed=1) and a != split_requests(reqs, 5, seed=2)
    big = split_requests(reqs, 100, seed=0)  # capped at half each
    assert len(big.tuning) == len(big.validation) == 12
    assert {r.subject for r in big.tuning} | {r.subject for r in big.validation} == {r.subject for r in reqs}


def test_too_few_records_to_split_is_an_error() -> None:
    with pytest.raises(TuneError, match=r"too few records to split: need at least 4 .* got 3"):
        split_requests(parse_requests(RECORDS[:3]), 10, seed=0)
    with pytest.raises(TuneError, match="--n-edits"):
        split_requests(parse_requests(RECORDS), 1, seed=0)


def test_objective_is_the_harmonic_mean_minus_drift_and_fluency_loss() -> None:
    m = {"efficacy": 100.0, "paraphrase": 50.0, "neighborhood": 100.0, "neighborhood_auto": 0.0}
    assert objective(m) == pytest.approx(75.0)  # 3 / (1/100 + 1/50 + 1/100)
    assert objective({**m, "drift_ppl_rel": 0.05}) == pytest.approx(70.0)
    assert objective({**m, "drift_ppl_rel": -0.05}) == pytest.approx(75.0)  # less perplexity is no bonus
    assert objective({**m, "fluency_rel": -0.03}) == pytest.approx(72.0)  # 1 point per 1 % of fluency lost
    assert objective({**m, "fluency_rel": 0.03}) == pytest.approx(75.0)  # and no bonus for more
    assert objective({"efficacy": 100.0, "neighborhood_auto": 50.0}) == pytest.approx(200 / 3)
    assert objective({"zsre_efficacy": 100.0, "zsre_paraphrase": 50.0, "zsre_specificity": 100.0}) == pytest.approx(
        75.0
    )
    with pytest.raises(TuneError, match="nothing to score"):
        objective({"heldout": 90.0})


def _summary(mlp: list[float]) -> TraceSummary:
    return TraceSummary(
        n=1,
        noise_std=1.0,
        samples=1,
        window=1,
        p_clean=1.0,
        p_corrupt=0.0,
        buckets=list(BUCKETS),
        hidden_effect=[[0.0] * 6 for _ in mlp],
        mlp_effect=mlp,
    )


def _coordinate_search(base, trace, windows, score, limit=40):
    """The search over a pure scoring function of the config (no model): what run_tune does per trial."""
    axes = search_axes(base, windows, SearchSpace())
    traced = best_window(trace, len(base.layers))

    def run_trial(i: int, config: MemitConfig) -> Trial:
        return Trial(i, tuned_values(config), {}, score(config), 0.0)

    return search(lambda trials: next_trial(base, traced, axes, trials), run_trial, limit, 1e9, 0.0, lambda: 0.0)


def test_coordinate_search_starts_at_the_defaults_then_the_traced_window() -> None:
    trace = _summary([0.0, 0.1, 0.3, 0.5, 0.2, 0.0])
    base = MemitConfig(layers=(0, 1), mom2_update_weight=100.0)
    windows = candidate_windows(trace, 6, SearchSpace())
    assert windows[(2, 0)] == (2, 3) and windows[(2, -1)] == (1, 2) and windows[(1, 1)] == (4,)
    assert all(0 <= w[0] and w[-1] < 6 for w in windows.values())
    out = _coordinate_search(base, trace, windows, lambda c: 0.0, limit=8)
    configs = [base.replace(**t.hparams) for t in out.trials]
    assert configs[0] == base and configs[1].layers == (2, 3) and len(configs) == 8
    assert len({repr(c.to_dict()) for c in configs}) == 8  # distinct
    # with nothing better than the defaults, the next trials vary λ of the defaults, nearest first
    assert [c.mom2_update_weight for c in configs[2:6]] == [30.0, 300.0, 10.0, 1000.0]
    assert all(c.layers == (0, 1) and c.v_num_grad_steps == base.v_num_grad_steps for c in configs[2:6])
    again = _coordinate_search(base, trace, windows, lambda c: 0.0, limit=8)
    assert [t.hparams for t in again.trials] == [t.hparams for t in out.trials]  # deterministic
    needed = set(covariance_layers(windows, base))
    assert all(set(c.layers) <= needed for c in configs) and {0, 1} <= needed


def test_coordinate_search_follows_improvements_and_stops_when_every_neighbour_is_measured() -> None:
    """A separable score peaking at λ × 0.3 and twice the steps: the search reaches that peak, moving
    from the best so far, and ends on its own once no neighbour of the peak is left untried."""
    trace = _summary([0.0, 0.1, 0.3, 0.5, 0.2, 0.0])
    base = MemitConfig(layers=(0, 1), mom2_update_weight=100.0, v_num_grad_steps=20)
    windows = candidate_windows(trace, 6, SearchSpace())

    def score(c: MemitConfig) -> float:
        return -abs(math.log(c.mom2_update_weight / 30.0)) - abs(c.v_num_grad_steps - 40) / 10

    out = _coordinate_search(base, trace, windows, score, limit=200)
    assert out.best.hparams["mom2_update_weight"] == 30.0 and out.best.hparams["v_num_grad_steps"] == 40
    assert not out.stopped_by_budget and len(out.trials) < 200 and "every neighbour" in out.message
    lams = [t.hparams["mom2_update_weight"] for t in out.trials]
    assert lams[2:4] == [30.0, 10.0]  # λ × 0.3 won, then below it; above it λ 100 already lost
    assert 300.0 not in lams and 1000.0 not in lams  # that direction was given up
    # after λ × 0.3 won, the steps are varied at λ 30, not at the default λ
    steps_trials = [t.hparams for t in out.trials if t.hparams["v_num_grad_steps"] != 20]
    assert steps_trials[0]["mom2_update_weight"] == 30.0


def test_time_box_keeps_the_best_trial_so_far_and_says_so() -> None:
    """Each trial takes 10 s of the clock; a 25 s box admits three trials (checked before each start)."""
    plan = [MemitConfig(mom2_update_weight=float(i + 1)) for i in range(5)]
    scores = [50.0, 80.0, 60.0, 99.0, 99.5]
    now = [0.0]

    def run_trial(i: int, config: MemitConfig) -> Trial:
        now[0] += 10.0
        return Trial(i, {"mom2_update_weight": config.mom2_update_weight}, {}, scores[i], 10.0)

    def in_order(trials):
        return plan[len(trials)] if len(trials) < len(plan) else None

    out = search(in_order, run_trial, 5, budget_s=25.0, started=0.0, clock=lambda: now[0])
    assert [t.index for t in out.trials] == [0, 1, 2] and out.stopped_by_budget
    assert out.best.index == 1 and out.best.hparams == {"mom2_update_weight": 2.0}
    assert "time box of 0.416667 min reached after 3 of 5 trials: keeping the best trial so far, trial 1" in out.message
    full = search(in_order, run_trial, 5, budget_s=1e9, started=now[0], clock=lambda: now[0])
    assert not full.stopped_by_budget and full.best.index == 4 and full.message.startswith("5 trials run;")
    first_only = search(in_order, run_trial, 5, budget_s=0.0, started=now[0], clock=lambda: now[0])
    assert [t.index for t in first_only.trials] == [0]  # the first trial always runs


# --------------------------------------------------------------------------- end to end (real MLflow)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny GPT-2 directory (with editflow.json), a statistics corpus, records, and an sqlite store."""
    root = tmp_path_factory.mktemp("tune")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("EDITFLOW_CACHE", str(root / "cache"))
    mp.setenv("EDITFLOW_QUIET", "1")
    model, tok = tiny_model("gpt2")
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "tiny" / "editflow.json").write_text(json.dumps({"hparams": HPARAMS, "stats_tokens": 1000}))
    words = "alpha beta gamma delta the of in red green blue Paris London chess kappa rho sigma".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(words[i % 7 :] + words[: i % 7]) for i in range(80)))
    (root / "records.json").write_text(json.dumps(RECORDS))
    (root / "three.json").write_text(json.dumps(RECORDS[:3]))
    (root / "corpus.csv").write_text("not a corpus")
    yield root
    mp.undo()


def tune(ws: Path, name: str, *args: str, model: str = ""):
    """``editflow tune`` through the real entry point (which silences library progress bars)."""
    return CliRunner().invoke(
        main,
        [
            "tune",
            model or str(ws / "tiny"),
            "--records",
            str(ws / "records.json"),
            "--n-edits",
            "3",
            "--corpus",
            str(ws / "corpus.txt"),
            "--trace-samples",
            "2",
            "--registered-model",
            name,
            *args,
        ],
    )


def runs_of(parent_id: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_runs(
        [MlflowClient().get_run(parent_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def parent_of(name: str):
    from mlflow import MlflowClient

    c = MlflowClient()
    runs = c.search_runs(
        [e.experiment_id for e in c.search_experiments()], filter_string=f"tags.`editflow.tune.model` = '{name}'"
    )
    assert len(runs) == 1
    return runs[0]


def test_tune_parent_and_child_runs_and_the_stored_result(ws: Path) -> None:
    from mlflow import MlflowClient

    from editflow.registry.tuned import read_tuned
    from editflow.registry.versions import tags_of, versions_of

    res = tune(ws, "tiny-a", "--trials", "3", "--budget-minutes", "30")
    assert res.exit_code == 0, res.output
    parent = parent_of("tiny-a")
    assert parent.info.status == "FINISHED" and parent.data.tags["editflow.tune.stopped"] == "complete"
    assert parent.data.params["tune.n_tuning"] == "3" and parent.data.params["tune.n_validation"] == "3"
    children = runs_of(parent.info.run_id)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert all({"trial", "hp.layers", "hp.mom2_update_weight", "hp.v_lr"} <= set(c.data.params) for c in children)
    assert all(
        {"objective", "post/efficacy", "post/fluency_rel", "time/trial_s"} <= set(c.data.metrics) for c in children
    )
    best = max(children, key=lambda c: (c.data.metrics["objective"], -int(c.data.params["trial"])))
    assert parent.data.tags["editflow.tune.best_trial"] == best.data.params["trial"]

    report = json.loads(Path(MlflowClient().download_artifacts(parent.info.run_id, "tune_report.json")).read_text())
    assert not set(report["split"]["tuning"]) & set(report["split"]["validation"])
    assert [t["index"] for t in report["trials"]] == [0, 1, 2] and report["trials"][0]["hparams"] == report["defaults"]
    assert len(report["trace"]["mlp_effect"]) == 4 and len(report["trace"]["best_window"]) == 2

    reg = Registry()
    [version] = versions_of(reg, "tiny-a")  # the base was not registered: the tune registered it, once
    assert tags_of(reg, "tiny-a", 1)["editflow.role"] == "base"
    stored = read_tuned(reg, "tiny-a", 1)
    assert stored["run_id"] == parent.info.run_id and stored["hparams"] == report["hparams"]
    assert stored["hparams"]["layers"] == [int(x) for x in best.data.params["hp.layers"].split(",")]
    assert stored["validation"]["objective"] == pytest.approx(report["validation"]["objective"], abs=1e-3)
    assert stored["validation"]["efficacy"] == pytest.approx(parent.data.metrics["validation/efficacy"], abs=1e-3)
    assert MemitConfig().replace(**stored["hparams"]).layers == tuple(stored["hparams"]["layers"])
    assert "stored on tiny-a version 1" in res.output and "validation (3 requests)" in res.output


def test_from_published_searches_from_the_family_defaults(ws: Path) -> None:
    """The tiny model ships its own defaults (editflow.json); --from-published ignores them."""
    from mlflow import MlflowClient

    from editflow.config import default_config

    res = tune(ws, "tiny-p", "--trials", "1", "--from-published")
    assert res.exit_code == 0, res.output
    parent = parent_of("tiny-p")
    report = json.loads(Path(MlflowClient().download_artifacts(parent.info.run_id, "tune_report.json")).read_text())
    published = json.loads(json.dumps(tuned_values(default_config("gpt2", 4))))
    assert report["start"] == "published" and parent.data.params["tune.start"] == "published"
    assert report["defaults"] == published != json.loads(json.dumps({**published, **HPARAMS}))
    assert report["trials"][0]["hparams"] == published


def test_time_box_ends_the_search_keeps_the_best_and_says_so(ws: Path) -> None:
    """Also: a models:/ URI of a registered base is tuned in place (no new version)."""
    import mlflow

    from editflow.registry import resolve
    from editflow.registry.tuned import read_tuned
    from editflow.registry.versions import versions_of

    reg = Registry()
    with mlflow.start_run(experiment_id=reg.ensure_experiment(), run_name="register"):
        resolve.ensure_registered_base(reg, resolve.resolve_base(reg, str(ws / "tiny"), device="cpu"), "tiny-b")
    res = tune(ws, "", "--trials", "4", "--budget-minutes", "0.0001", model="models:/tiny-b@production")
    assert res.exit_code == 0, res.output
    assert "time box of 0.0001 min reached after 1 of 4 trials: keeping the best trial so far, trial 0" in res.output
    parent = parent_of("tiny-b")
    assert parent.data.tags["editflow.tune.stopped"] == "budget" and len(runs_of(parent.info.run_id)) == 1
    stored = read_tuned(reg, "tiny-b", 1)
    assert stored["stopped_by_budget"] is True and stored["trials"] == 1 and stored["trial"] == 0
    assert [int(v.version) for v in versions_of(reg, "tiny-b")] == [1] and "stored on tiny-b version 1" in res.output


def test_too_few_records_is_one_error_line_and_registers_nothing(ws: Path) -> None:
    from editflow.registry.versions import versions_of

    reg = Registry()
    res = CliRunner().invoke(
        main, ["tune", str(ws / "tiny"), "--records", str(ws / "three.json"), "--registered-model", "tiny-c"]
    )
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("error: too few records to split: need at least 4")
    assert versions_of(reg, "tiny-c") == []


def test_failed_tune_registers_nothing_and_fails_its_run(ws: Path) -> None:
    """The statistics corpus is unreadable: the run fails after the trace, before any trial."""
    from mlflow import MlflowClient

    from editflow.registry.versions import versions_of

    reg = Registry()
    res = tune(ws, "tiny-d", "--trials", "2", "--corpus", str(ws / "corpus.csv"))
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("error: cannot read") and "nothing registered" in res.output
    parent = parent_of("tiny-d")
    assert parent.info.status == "FAILED" and runs_of(parent.info.run_id) == []
    assert versions_of(reg, "tiny-d") == []
    assert not [m for m in MlflowClient().search_registered_models() if m.name == "tiny-d"]


def test_a_failed_store_unregisters_the_version_it_registered(ws: Path) -> None:
    """MLflow refuses a tag over 100,000 characters after the base was registered: it is deleted again."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from editflow.registry import resolve
    from editflow.registry.versions import versions_of
    from editflow.tune import register_and_store

    reg = Registry()
    base = resolve.resolve_base(reg, str(ws / "tiny"), device="cpu")
    result = {"hparams": {"v_lr": 0.5}, "validation": {"efficacy": 100.0}, "run_id": "x", "note": "x" * 200_000}
    with (
        mlflow.start_run(experiment_id=reg.ensure_experiment(), run_name="store-fails"),
        pytest.raises(MlflowException, match="100000"),
    ):
        register_and_store(reg, base, "tiny-e", False, result)
    assert versions_of(reg, "tiny-e") == []
    assert not [m for m in MlflowClient().search_registered_models() if m.name == "tiny-e"]


def test_store_and_read_tuned_round_trip(ws: Path) -> None:
    import mlflow

    from editflow.registry import resolve
    from editflow.registry.tuned import TUNED_TAG, read_tuned, store_tuned

    reg = Registry()
    with mlflow.start_run(experiment_id=reg.ensure_experiment(), run_name="register"):
        base = resolve.ensure_registered_base(reg, resolve.resolve_base(reg, str(ws / "tiny"), device="cpu"), "tiny-f")
    assert read_tuned(reg, "tiny-f", base.version) is None
    result = {
        "hparams": {"layers": [0, 1], "v_lr": 0.25},
        "validation": {"efficacy": 97.5, "objective": 88.1},
        "run_id": "abc",
    }
    store_tuned(reg, "tiny-f", base.version, result)
    assert read_tuned(reg, "tiny-f", base.version) == result
    assert reg.client.get_model_version("tiny-f", str(base.version)).tags[TUNED_TAG] == json.dumps(
        result, separators=(",", ":"), sort_keys=True
    )
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        store_tuned(reg, "tiny-f", base.version, {**result, "hparams": {"not_a_field": 1}})
    assert read_tuned(reg, "tiny-f", base.version) == result  # unchanged
    reg.client.set_model_version_tag("tiny-f", str(base.version), TUNED_TAG, "{broken")
    with pytest.raises(ValueError, match="not JSON"):
        read_tuned(reg, "tiny-f", base.version)


def test_tuning_an_edited_version_tunes_and_stores_on_its_base(ws: Path) -> None:
    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.promotion import GateThresholds
    from editflow.registry.tuned import read_tuned
    from editflow.registry.versions import tags_of, versions_of

    reg = Registry()
    (ws / "one.json").write_text(json.dumps(RECORDS[:1]))
    out = run_edit(
        EditJob(
            requests=str(ws / "one.json"),
            model=str(ws / "tiny"),
            registered_model="tiny-g",
            corpus=str(ws / "corpus.txt"),
            fluency=False,
            promote="never",
            thresholds=GateThresholds(0.0, 100.0, 100.0),
        )
    )
    assert (out.version, out.parent_version) == (2, 1)
    res = tune(ws, "", "--trials", "1", model="models:/tiny-g/2")
    assert res.exit_code == 0, res.output
    assert "stored on tiny-g version 1" in res.output
    assert read_tuned(reg, "tiny-g", 1) is not None and read_tuned(reg, "tiny-g", 2) is None
    assert [int(v.version) for v in versions_of(reg, "tiny-g")] == [1, 2]
    assert parent_of("tiny-g").data.params["base.fingerprint"] == tags_of(reg, "tiny-g", 1)["editflow.fingerprint"]
