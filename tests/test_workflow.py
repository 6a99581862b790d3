"""The MLflow workflow end to end on a real sqlite store: edit runs, versions, promotion, rollback,
failure semantics, export and the pyfunc flavor."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import OperationalError

from editflow import pipeline
from editflow.pipeline import EditJob, run_edit
from editflow.registry import ledger, promotion
from editflow.registry.report import compare_versions, version_rows
from editflow.registry.store import Registry
from editflow.registry.versions import aliases_of, export_version, load_version, tags_of, versions_of
from editflow.requests import RequestError

HPARAMS = {
    "layers": [1, 2],
    "mom2_update_weight": 0.5,
    "v_num_grad_steps": 40,
    "clamp_norm_factor": 50.0,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "context_templates": 0,
}
FACTS = [
    {"prompt": "alpha {}", "subject": "gamma delta", "target_new": "Paris"},
    {"prompt": "sigma {}", "subject": "rho", "target_new": "chess"},
]
MORE_FACTS = [{"prompt": "the {}", "subject": "kappa lambda mu", "target_new": "violin"}]
#: A random tiny model's perplexity and known facts move a lot with any edit: the tests check the
#: workflow, so the gate only asks for efficacy (its cumulative rules are tested in test_lineage.py).
LOOSE = promotion.GateThresholds(
    min_efficacy=50.0,
    max_specificity_drop=100.0,
    max_ppl_increase=100.0,
    min_retention=0.0,
    max_ppl_increase_root=100.0,
    max_specificity_drop_root=100.0,
)


def make_workspace(root: Path) -> dict[str, Path]:
    """A tiny model directory (with its editflow.json), a statistics corpus and request files."""
    model, tok = tiny_model("gpt2")
    model_dir = root / "tinymodel"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (model_dir / "editflow.json").write_text(json.dumps({"hparams": HPARAMS, "stats_tokens": 1000}))
    words = "alpha beta gamma delta the of in red green blue Paris London chess kappa rho sigma".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(words[i % 7 :] + words[: i % 7]) for i in range(80)))
    facts, more = root / "facts.json", root / "more.jsonl"
    facts.write_text(json.dumps(FACTS))
    more.write_text("\n".join(json.dumps(r) for r in MORE_FACTS))
    return {"model": model_dir, "corpus": corpus, "facts": facts, "more": more}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("EDITFLOW_CACHE", str(root / "cache"))
    mp.setenv("EDITFLOW_ACTOR", "tester")
    paths = make_workspace(root)
    paths["root"] = root
    yield paths
    mp.undo()


def job(ws, **kw) -> EditJob:
    base = dict(
        requests=str(ws["facts"]),
        model=str(ws["model"]),
        corpus=str(ws["corpus"]),
        fluency=False,
        thresholds=LOOSE,
        registered_model="tiny",
    )
    return EditJob(**{**base, **kw})


class InjectedFailure(RuntimeError):
    """Raised right after a pipeline phase by :func:`fail_after`."""


#: The pipeline function at whose end each phase's failure is injected.
PHASE_END = {"edit": "_edit", "eval": "_retention", "log": "_log_artifacts"}


def fail_after(monkeypatch: pytest.MonkeyPatch, phase: str) -> None:
    """Make edit runs raise :class:`InjectedFailure` right after ``phase`` ("edit", "eval" or "log")."""
    original = getattr(pipeline, PHASE_END[phase])

    def failing(*args, **kwargs):
        original(*args, **kwargs)
        raise InjectedFailure(f"injected failure after {phase}")

    monkeypatch.setattr(pipeline, PHASE_END[phase], failing)


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def top1(handle, text: str) -> str:
    from editflow.generation import complete

    return complete(handle.model, handle.tokenizer, [text], max_new_tokens=1)[0].strip()


@pytest.fixture(scope="module")
def first_edit(ws):
    """Version 1 = the base (registered in full), version 2 = the first edit, promoted by the gate."""
    return run_edit(job(ws))


def test_edit_run_registers_a_version_with_lineage(ws, first_edit):
    from mlflow import MlflowClient

    reg = Registry()
    out = first_edit
    assert (out.name, out.version, out.parent_version, out.promoted) == ("tiny", 2, 1, True)
    assert out.metrics["post/efficacy"] == 100.0 and out.metrics["pre/efficacy"] == 0.0
    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["hp.layers"] == "1,2" and p["edit.algorithm"] == "memit" and p["edit.mode"] == "batch"
    assert p["requests.count"] == "2" and len(p["requests.digest"]) == 64 and p["base.model"] == "models:/tiny/1"
    assert "base.fingerprint" in p and p["stats.tokens"] == "1000"
    m = run.data.metrics
    assert {
        "pre/efficacy",
        "post/efficacy",
        "time/stats",
        "time/edit_targets",
        "time/edit_solve",
        "time/eval_post",
        "memory/peak_rss_mb",
    } <= set(m)
    # pre and post on one chart: one metric per figure, step 0 = pre, step 1 = post
    prepost = [(h.step, h.value) for h in MlflowClient().get_metric_history(out.run_id, "prepost/efficacy")]
    assert sorted(prepost) == [(0, m["pre/efficacy"]), (1, m["post/efficacy"])]
    artifacts = {a.path for a in MlflowClient().list_artifacts(out.run_id, "eval")}
    assert {
        "eval/facts.csv",
        "eval/prob_new_pre_vs_post.png",
        "eval/layer_update_norms.json",
        "eval/facts.json",
    } <= artifacts
    stats = [a.path for a in MlflowClient().list_artifacts(out.run_id, "stats")]
    assert sum(s.endswith(".npz") for s in stats) == 2 and sum(s.endswith(".manifest.json") for s in stats) == 2
    tags = tags_of(reg, "tiny", 2)
    assert tags["editflow.parent_version"] == "1" and tags["editflow.base_version"] == "1"
    assert tags["editflow.n_facts"] == "2" and tags["editflow.metric.efficacy"] == "100.00"
    # a few headline tags on the version; the rest is in its editflow.json, its run and its description
    assert set(tags) <= {
        "editflow.role",
        "editflow.parent_version",
        "editflow.base_version",
        "editflow.n_facts",
        "editflow.gate",
        "editflow.weights_sha256",
        *(f"editflow.metric.{m}" for m in ("efficacy", "neighborhood", "drift_ppl_rel", "retention")),
    }
    mv = MlflowClient().get_model_version("tiny", "2")
    assert mv.run_id == out.run_id and "with memit (batch)" in mv.description and "edit state" in mv.description
    meta = load_version(reg, "tiny", 2, device="cpu").handle.extra["editflow"]
    assert meta["run_id"] == out.run_id and meta["hparams"]["algorithm"] == "memit"
    assert meta["edit_state"]["n_keys"] == 2 and len(meta["edit_state"]["sha256"]) == 64
    assert set(meta["root_references"]) <= {"drift_ppl", "heldout", "drift_slice"} and meta["fingerprint"]
    # production went 1 (the base) -> 2 (whatever the module's later tests did since)
    assert [e.version for e in ledger.events(reg, "tiny") if e.action == "promote"][:2] == [1, 2]
    assert [f.subject for f in ledger.own_facts(reg, "tiny", 2)] == ["gamma delta", "rho"]


def test_delta_version_stores_only_edited_tensors_and_reconstructs(ws, first_edit):

    reg = Registry()
    v2 = load_version(reg, "tiny", 2, device="cpu")
    assert v2.fingerprint == v2.handle.extra["editflow"]["fingerprint"]
    assert v2.edited_tensors == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    assert top1(v2.handle, "alpha gamma delta") == "Paris" and top1(v2.handle, "sigma rho") == "chess"
    from editflow.registry.flavor import download

    src = Path(download(reg.client.get_model_version_download_uri("tiny", "2"), str(ws["root"] / "dl")))
    assert (src / "edited.safetensors").is_file() and not (src / "weights").exists()
    v1 = load_version(reg, "tiny", 1, device="cpu")
    changed = {
        n for n, t in v2.handle.model.state_dict().items() if not torch.equal(t, v1.handle.model.state_dict()[n])
    }
    assert changed == set(v2.edited_tensors)


def test_next_edit_builds_on_production_and_rollback_is_bit_identical(ws, first_edit):
    """Version numbers are read from the outcome: other tests of the module may have run first."""
    reg = Registry()
    promotion.promote(reg, "tiny", 2, reason="build on the first edit")
    v1_hash = state_hash(load_version(reg, "tiny", 1, device="cpu").handle.model)
    v2_hash = state_hash(load_version(reg, "tiny", 2, device="cpu").handle.model)
    out = run_edit(job(ws, requests=str(ws["more"]), model="models:/tiny@production", promote="always"))
    v = out.version
    assert out.parent_version == 2 and v > 2
    # statistics belong to the root base: reused, with the run that produced them, not logged again
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    logged = [a.path for a in MlflowClient().list_artifacts(out.run_id, "stats")]
    assert logged and not any(p.endswith(".npz") for p in logged)
    manifest = json.loads(Path(download_artifacts(run_id=out.run_id, artifact_path=logged[0])).read_text())
    assert manifest["produced_by_run"] == first_edit.run_id
    newest = load_version(reg, "tiny", "@production", device="cpu")
    assert newest.version == v and top1(newest.handle, "the kappa lambda mu") == "violin"
    assert set(ledger.held_facts(reg, "tiny", v)) == {
        ("gamma delta", "alpha {}"),
        ("rho", "sigma {}"),
        ("kappa lambda mu", "the {}"),
    }
    assert promotion.rollback(reg, "tiny")["version"] == 2  # default: the previous production
    assert state_hash(load_version(reg, "tiny", "@production", device="cpu").handle.model) == v2_hash
    assert promotion.rollback(reg, "tiny", to=1)["version"] == 1
    assert state_hash(load_version(reg, "tiny", "@production", device="cpu").handle.model) == v1_hash
    promotion.promote(reg, "tiny", v, reason="back to the newest")
    assert aliases_of(reg, "tiny")["production"] == v

    stages = {int(v.version): v.current_stage for v in reg.client.search_model_versions("name='tiny'")}
    assert stages[v] == "Production" and stages[1] == "Archived"
    actions = [
        (e.action, e.version, e.previous_version, e.actor) for e in ledger.events(reg, "tiny") if e.action != "register"
    ]
    assert actions[-3:] == [("rollback", 2, v, "tester"), ("rollback", 1, 2, "tester"), ("promote", v, 1, "tester")]
    c = compare_versions(reg, "tiny", 2, v)
    assert [f.subject for f in c["only_b"]] == ["kappa lambda mu"] and c["only_a"] == []
    assert c["metrics"]["efficacy"][1] is not None
    rows = {r["version"]: r for r in version_rows(reg, "tiny")}
    assert {1, 2, v} <= set(rows) and rows[v]["facts"] == 3 and "production" in rows[v]["aliases"]


def test_gate_keeps_a_failing_edit_as_candidate(ws, first_edit):
    reg = Registry()
    before = aliases_of(reg, "tiny")["production"]
    strict = promotion.GateThresholds(min_efficacy=101.0)
    out = run_edit(job(ws, promote="if-better", thresholds=strict))
    assert not out.promoted and not out.gate.passed and "efficacy" in out.gate.reasons[0]
    assert aliases_of(reg, "tiny")["production"] == before and aliases_of(reg, "tiny")["candidate"] == out.version


def test_failures_leave_no_version(ws, first_edit, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    reg = Registry()
    n = len(versions_of(reg, "tiny"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "no placeholder", "subject": "x", "target_new": "y"}]))
    with pytest.raises(RequestError, match="record 0"):
        run_edit(job(ws, requests=str(bad)))
    for phase in ("edit", "eval", "log"):
        with monkeypatch.context() as mp, pytest.raises(InjectedFailure):
            fail_after(mp, phase)
            run_edit(job(ws))
    assert len(versions_of(reg, "tiny")) == n
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        order_by=["attributes.start_time DESC"],
        max_results=4,
    )
    assert [r.info.status for r in runs] == ["FAILED"] * 4


def test_failure_after_registration_rolls_the_version_back(ws, first_edit, monkeypatch):
    reg = Registry()
    n = len(versions_of(reg, "tiny"))
    monkeypatch.setenv("EDITFLOW_LEDGER_URI", "sqlite:////nonexistent-dir/ledger.db")
    with pytest.raises(OperationalError):
        run_edit(job(ws))
    monkeypatch.delenv("EDITFLOW_LEDGER_URI")
    assert len(versions_of(reg, "tiny")) == n


def test_failed_promotion_leaves_production(ws, first_edit):
    reg = Registry()
    before = aliases_of(reg, "tiny")["production"]
    target = next(int(v.version) for v in versions_of(reg, "tiny") if int(v.version) != before)
    with pytest.raises((MlflowException, LookupError)):
        promotion.promote(reg, "tiny", 99)
    with pytest.raises(OperationalError):
        promotion.promote(Registry(ledger_uri="sqlite:////nonexistent-dir/ledger.db"), "tiny", target)
    assert aliases_of(reg, "tiny")["production"] == before
    assert reg.client.get_model_version("tiny", str(before)).current_stage == "Production"
    assert reg.client.get_model_version("tiny", str(target)).current_stage != "Production"


def test_sequential_mode_logs_chunk_curves(ws, first_edit):
    from mlflow import MlflowClient

    facts = ws["root"] / "three.json"
    facts.write_text(json.dumps(FACTS + MORE_FACTS))
    out = run_edit(
        job(
            ws,
            requests=str(facts),
            hparams={"mode": "sequential", "chunk_size": 2, "algorithm": "alphaedit", "nullspace_threshold": 1e9},
            promote="never",
        )
    )
    history = MlflowClient().get_metric_history(out.run_id, "chunk/efficacy")
    assert [h.step for h in history] == [0, 1]
    assert "(sequential)" in MlflowClient().get_model_version("tiny", str(out.version)).description
    assert "eval/chunk_curve.png" in {a.path for a in MlflowClient().list_artifacts(out.run_id, "eval")}


def test_export_is_plain_transformers(ws, first_edit, tmp_path):
    from transformers import AutoModelForCausalLM

    reg = Registry()
    out = export_version(reg, "tiny", 2, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert state_hash(plain) == state_hash(load_version(reg, "tiny", 2, device="cpu").handle.model)
    assert (out / "tokenizer.json").is_file()


def test_pyfunc_answers_with_the_edited_fact(ws, first_edit):
    import mlflow.pyfunc

    Registry()  # points MLflow at this module's store (another test may have pointed it elsewhere)
    model = mlflow.pyfunc.load_model("models:/tiny/2")
    assert [a.strip() for a in model.predict(["alpha gamma delta", "sigma rho"], params={"max_new_tokens": 1})] == [
        "Paris",
        "chess",
    ]


@pytest.mark.slow
def test_concurrent_runs_register_distinct_versions(ws, first_edit):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable,
        "-m",
        "editflow.cli",
        "edit",
        str(ws["facts"]),
        "--model",
        str(ws["model"]),
        "--registered-model",
        "tiny",
        "--corpus",
        str(ws["corpus"]),
        "--no-fluency",
        "--promote",
        "never",
    ]
    procs = [
        subprocess.Popen(cmd, cwd=ws["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    # 0: registered and the gate passed; 3: registered, the gate kept it a candidate (either is fine here).
    assert all(p.returncode in (0, 3) for p in procs), outs
    versions = sorted(
        int(line.split("version ")[1].split()[0])
        for o, _ in outs
        for line in o.splitlines()
        if line.startswith("run ") and "registered tiny version" in line
    )
    assert len(versions) == 2 and versions[0] != versions[1]


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mlflow_run_project_with_local_env(ws, first_edit):
    from mlflow import MlflowClient

    reg = Registry()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO / "projects" / "memit"),
        "--env-manager",
        "local",
        "-P",
        f"requests={ws['facts']}",
        "-P",
        f"model={ws['model']}",
        "-P",
        f"corpus={ws['corpus']}",
        "-P",
        "registered_model=tiny-project",
        "-P",
        "fluency=false",
        "-P",
        "promote=always",
        "-P",
        "min_efficacy=50",
        "-P",
        "max_specificity_drop=100",
    ]
    proc = subprocess.run(cmd, cwd=ws["root"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered tiny-project version 2" in proc.stdout
    assert aliases_of(reg, "tiny-project")["production"] == 2
    run = MlflowClient().get_run(MlflowClient().get_model_version("tiny-project", "2").run_id)
    assert run.data.params["promote"] == "always" and run.data.params["gate.promote"] == "always"
    assert run.data.tags.get("mlflow.project.entryPoint") == "main"
    bad = subprocess.run(
        cmd[:7] + ["-P", "mode=diagonal", "-P", f"requests={ws['facts']}"],
        cwd=ws["root"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert bad.returncode != 0 and "mode" in bad.stderr + bad.stdout
    assert len(versions_of(reg, "tiny-project")) == 2


@pytest.mark.slow
def test_served_model_answers_with_the_edited_fact(ws, first_edit):
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/tiny/2",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ws["root"],
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws['root'] / 'mlflow.db'}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        body = json.dumps({"inputs": ["alpha gamma delta", "sigma rho"], "params": {"max_new_tokens": 1}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert [a.strip() for a in answer["predictions"]] == ["Paris", "chess"]
        # Beyond the serving limits: a 400 with the reason, and no work done.
        for inputs, params in ((["x"] * 3000, {"max_new_tokens": 1}), (["sigma rho"], {"max_new_tokens": 100000})):
            too_big = json.dumps({"inputs": inputs, "params": params}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=too_big, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=60)
            assert refused.value.code == 400 and b"256" in refused.value.read()  # the limit is named
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_registry_commands(ws, first_edit, tmp_path):
    from click.testing import CliRunner

    from editflow.cli import main

    reg = Registry()
    run = lambda *args: CliRunner().invoke(main, list(args), catch_exceptions=False)  # noqa: E731
    out = run("versions", "tiny")
    assert out.exit_code == 0 and "version" in out.output.splitlines()[0] and "production" in out.output
    promotion.promote(reg, "tiny", 1, reason="so that promoting 2 moves production")  # earlier tests' state
    prod = aliases_of(reg, "tiny")["production"]
    out = run("promote", "tiny", "2", "--reason", "cli test")
    assert out.exit_code == 0 and f"production {prod} -> 2" in out.output
    out = run("show", "tiny", "production")
    assert out.exit_code == 0 and "tiny version 2" in out.output and "alpha gamma delta -> Paris" in out.output
    assert "cli test" in out.output
    out = run("compare", "tiny", "1", "2")
    assert out.exit_code == 0 and "efficacy" in out.output and "only in v2: 2 facts" in out.output
    eff = next(line.split() for line in out.output.splitlines() if line.startswith("efficacy "))
    assert eff[1:] == ["0.000", "100.000", "100.000"]  # the base is measured by its child run's pre-edit figures
    out = run("facts", "tiny", "--subject", "GAMMA")
    assert out.exit_code == 0 and "alpha gamma delta" in out.output and "Paris" in out.output
    out = run("rollback", "tiny", "--to", "1")
    assert out.exit_code == 0 and aliases_of(reg, "tiny")["production"] == 1
    out = run("promote", "tiny", "99")
    assert out.exit_code == 1 and aliases_of(reg, "tiny")["production"] == 1
    out = run("export", "tiny", "2", str(tmp_path / "exported"))
    assert out.exit_code == 0 and (tmp_path / "exported" / "config.json").is_file()
    out = run("edit", str(tmp_path / "missing.json"), "--model", str(ws["model"]))
    assert out.exit_code == 1


def test_init_registers_the_bundled_model_once(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from editflow.cli import main
    from editflow.registry.store import DEFAULT_MODEL_NAME

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for _ in range(2):
        out = CliRunner().invoke(main, ["init"], catch_exceptions=False)
        assert out.exit_code == 0 and f"{DEFAULT_MODEL_NAME} version 1" in out.output
    reg = Registry()
    assert [int(v.version) for v in versions_of(reg, DEFAULT_MODEL_NAME)] == [1]
    assert aliases_of(reg, DEFAULT_MODEL_NAME) == {"production": 1}
    run_id = next(
        r
        for r in MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
        if r.info.run_name == "register-default-model"
    ).info.run_id
    assert [a.path for a in MlflowClient().list_artifacts(run_id, "default_model")] == ["default_model/card.json"]
    assert ledger.production_history(reg, DEFAULT_MODEL_NAME) == [1]
