"""Registry integrity on a real sqlite store: weight digests, corruption, real kills at named steps
(``EDITFLOW_CRASH_AT``, SIGKILL), repair, promotion intents and concurrent first edits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_workflow import LOOSE, make_workspace

from editflow.pipeline import run_edit
from editflow.registry import integrity, ledger, promotion
from editflow.registry.integrity import IncompleteVersionError, WeightsIntegrityError
from editflow.registry.store import Registry
from editflow.registry.versions import aliases_of, load_version, tags_of, versions_of


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("EDITFLOW_CACHE", str(root / "cache"))
    mp.setenv("EDITFLOW_ACTOR", "tester")
    paths = make_workspace(root)
    paths["root"] = root
    yield paths
    mp.undo()


def edit_job(ws, name: str = "tiny", **kw):
    from editflow.pipeline import EditJob

    base = dict(
        requests=str(ws["facts"]),
        model=str(ws["model"]),
        corpus=str(ws["corpus"]),
        fluency=False,
        thresholds=LOOSE,
        registered_model=name,
        promote="always",
    )
    return EditJob(**{**base, **kw})


@pytest.fixture(scope="module")
def lineage(ws):
    """tiny: v1 base (full), v2 and v3 deltas; production v3, history [1, 2, 3]."""
    run_edit(edit_job(ws))
    run_edit(edit_job(ws, requests=str(ws["more"]), model="models:/tiny@production"))
    assert aliases_of(Registry(), "tiny")["production"] == 3
    return ws


def cli(ws, *args: str, crash: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m editflow.cli ARGS`` in the workspace, killed at ``crash`` when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITFLOW_QUIET": "1"}
    env.pop(integrity.CRASH_ENV, None)
    if crash:
        env[integrity.CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "editflow.cli", *args],
        cwd=ws["root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def edit_args(ws, name: str = "tiny", model: str = "models:/tiny@production") -> list[str]:
    return [
        "edit",
        str(ws["more"]),
        "--model",
        model,
        "--registered-model",
        name,
        "--corpus",
        str(ws["corpus"]),
        "--no-fluency",
        "--promote",
        "always",
        "--min-efficacy",
        "0",
        "--max-specificity-drop",
        "100",
        "--max-ppl-increase",
        "100",
        "--min-retention",
        "0",
        "--max-ppl-increase-root",
        "100",
        "--max-specificity-drop-root",
        "100",
    ]


def artifact_dir(name: str, version: int) -> Path:
    from editflow.registry.flavor import local_path

    path = local_path(Registry().client.get_model_version_download_uri(name, str(version)))
    assert path is not None
    return path


def consistent(name: str) -> None:
    """Production alias, stage and ledger history agree; no intent left; no pending version usable."""
    reg = Registry()
    prod = aliases_of(reg, name).get("production")
    assert ledger.production_history(reg, name)[-1:] == ([prod] if prod else [])
    if prod:
        assert reg.client.get_model_version(name, str(prod)).current_stage == "Production"
    assert promotion.read_intent(reg, name) is None
    assert not any(integrity.is_pending(v) for v in versions_of(reg, name))


# --------------------------------------------------------------------------- digests


def test_file_digest_is_cached_per_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = integrity.file_sha256(f)
    assert integrity.file_sha256(f) == first and len(integrity._digest_cache) >= 1
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert integrity.file_sha256(f) != first


def test_versions_record_weight_digests(lineage):
    reg = Registry()
    base_tags, delta_tags = tags_of(reg, "tiny", 1), tags_of(reg, "tiny", 2)
    base_meta = json.loads((artifact_dir("tiny", 1) / "editflow.json").read_text())
    delta_meta = json.loads((artifact_dir("tiny", 2) / "editflow.json").read_text())
    assert set(base_meta["weights_sha256"]["files"]) == {"weights/model.safetensors"}
    assert integrity.manifest_digest(base_meta["weights_sha256"]) == base_tags["editflow.weights_sha256"]
    assert set(delta_meta["weights_sha256"]["files"]) == {"edited.safetensors"}
    assert delta_meta["weights_sha256"]["base"] == base_tags["editflow.weights_sha256"]
    assert integrity.manifest_digest(delta_meta["weights_sha256"]) == delta_tags["editflow.weights_sha256"]
    assert "editflow.pending" not in base_tags and "editflow.pending" not in delta_tags
    checked = integrity.verify_version(reg, "tiny", 3)
    assert [c.version for c in checked] == [3, 1]


def test_verify_command(lineage):
    out = cli(lineage, "verify", "tiny", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["version"] == 3 and [c["version"] for c in doc["checked"]] == [3, 1]
    assert list(doc["checked"][1]["files"]) == ["weights/model.safetensors"]


# --------------------------------------------------------------------------- corruption


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped", "truncated"])
@pytest.mark.parametrize("where", ["base", "delta"])
def test_corrupt_weights_are_refused_and_production_stays(lineage, tmp_path, damage, where):
    reg = Registry()
    version, rel = (1, "weights/model.safetensors") if where == "base" else (2, "edited.safetensors")
    target = artifact_dir("tiny", version) / rel
    backup = tmp_path / "backup"
    shutil.copy2(target, backup)
    prod, history = aliases_of(reg, "tiny")["production"], ledger.production_history(reg, "tiny")
    damage(target)
    try:
        with pytest.raises(WeightsIntegrityError, match=rel.split("/")[-1]):
            load_version(reg, "tiny", 2, device="cpu")
        with pytest.raises(WeightsIntegrityError, match=rel.split("/")[-1]):
            promotion.promote(reg, "tiny", 2)
        with pytest.raises(WeightsIntegrityError):
            promotion.rollback(reg, "tiny")  # to 2
        out = cli(lineage, "verify", "tiny", "2")
        assert out.returncode == 1 and rel.split("/")[-1] in out.stderr
        assert aliases_of(reg, "tiny")["production"] == prod and ledger.production_history(reg, "tiny") == history
    finally:
        shutil.copy(backup, target)
    assert load_version(reg, "tiny", 2, device="cpu").version == 2


def test_altered_digest_record_is_refused(lineage, tmp_path):
    """Corrupt weights with editflow.json rewritten to match them: the version's tag catches it."""
    reg = Registry()
    d = artifact_dir("tiny", 2)
    saved = {p: p.read_bytes() for p in (d / "edited.safetensors", d / "editflow.json")}
    try:
        flip_byte(d / "edited.safetensors")
        meta = json.loads(saved[d / "editflow.json"])
        meta["weights_sha256"]["files"]["edited.safetensors"] = integrity.file_sha256(d / "edited.safetensors")
        (d / "editflow.json").write_text(json.dumps(meta))
        with pytest.raises(WeightsIntegrityError, match="editflow.json altered"):
            load_version(reg, "tiny", 2, device="cpu")
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


# --------------------------------------------------------------------------- promotion semantics


def test_repromoting_production_adds_no_entry(lineage):
    reg = Registry()
    prod = aliases_of(reg, "tiny")["production"]
    n = len(ledger.events(reg, "tiny"))
    moved = promotion.promote(reg, "tiny", prod)
    assert moved["version"] == moved["previous"] == prod and len(ledger.events(reg, "tiny")) == n
    before = ledger.previous_production(reg, "tiny", prod)
    assert before is not None and promotion.rollback(reg, "tiny")["version"] == before
    promotion.promote(reg, "tiny", prod)
    consistent("tiny")


@pytest.mark.parametrize("step", ["after_alias_move", "before_promote_event"])
def test_killed_promotion_is_finished_by_repair(lineage, step):
    reg = Registry()
    prod = aliases_of(reg, "tiny")["production"]
    target = 2 if prod != 2 else 1
    out = cli(lineage, "promote", "tiny", str(target), crash=step)
    assert out.returncode == -9, out.stderr
    intent = promotion.read_intent(reg, "tiny")
    assert intent and intent["target"] == target and intent["previous"] == prod
    report = integrity.repair(reg, "tiny")
    assert report.intents and "finished" in report.intents[0]
    assert aliases_of(reg, "tiny")["production"] == target
    last = [e for e in ledger.events(reg, "tiny") if e.action == "promote"][-1]
    assert (last.version, last.previous_version) == (target, prod) and "repair" in last.reason
    consistent("tiny")
    assert promotion.rollback(reg, "tiny")["version"] == prod
    consistent("tiny")


def test_killed_promotion_is_resolved_by_the_next_promotion(lineage):
    reg = Registry()
    prod = aliases_of(reg, "tiny")["production"]
    target = 2 if prod != 2 else 1
    assert cli(lineage, "promote", "tiny", str(target), crash="after_alias_move").returncode == -9
    out = cli(lineage, "rollback", "tiny")
    assert out.returncode == 0, out.stderr
    assert aliases_of(reg, "tiny")["production"] == prod
    consistent("tiny")


# --------------------------------------------------------------------------- killed registrations


@pytest.mark.slow
@pytest.mark.parametrize("step", ["after_register_model", "after_tags", "after_ledger_write"])
def test_killed_registration_leaves_no_usable_version(lineage, step):
    reg = Registry()
    prod, history = aliases_of(reg, "tiny")["production"], ledger.production_history(reg, "tiny")
    known = {int(v.version) for v in versions_of(reg, "tiny", include_pending=True)}
    out = cli(lineage, *edit_args(lineage), crash=step)
    assert out.returncode == -9, out.stderr[-2000:]
    [half] = [v for v in versions_of(reg, "tiny", include_pending=True) if int(v.version) not in known]
    version = int(half.version)
    assert integrity.is_pending(half) and version not in {int(v.version) for v in versions_of(reg, "tiny")}
    with pytest.raises(IncompleteVersionError, match="incomplete"):
        load_version(reg, "tiny", version)
    with pytest.raises(IncompleteVersionError):
        promotion.promote(reg, "tiny", version)
    # `editflow promote` first repairs what the killed process left: the half version is deleted (its
    # owner is dead), its run ends FAILED, and the promotion finds no such version; production stays.
    run_id = half.run_id
    promote_cli = cli(lineage, "promote", "tiny", str(version))
    assert promote_cli.returncode == 1 and "not found" in promote_cli.stderr
    assert integrity.repair(reg, "tiny").deleted == []  # nothing left to repair
    assert version not in {int(v.version) for v in versions_of(reg, "tiny", include_pending=True)}
    assert ledger.own_facts(reg, "tiny", version) == [] and ledger.parent_of(reg, "tiny", version) is None
    run = reg.client.get_run(run_id)
    assert run.info.status == "FAILED" and "orphaned" in run.data.tags["editflow.error"]
    assert aliases_of(reg, "tiny")["production"] == prod and ledger.production_history(reg, "tiny") == history
    consistent("tiny")
    assert promotion.rollback(reg, "tiny")["version"] == history[-2]
    promotion.promote(reg, "tiny", prod)
    consistent("tiny")


@pytest.mark.slow
def test_killed_first_base_registration_is_undone(lineage):
    """The first edit of a new model registers its base, which is promoted inside its registration;
    a kill before the pending tag is cleared leaves production on a pending version: repair voids it."""
    reg = Registry()
    args = edit_args(lineage, name="fresh", model=str(lineage["model"]))
    out = cli(lineage, *args, crash="after_ledger_write")
    assert out.returncode == -9, out.stderr[-2000:]
    [half] = versions_of(reg, "fresh", include_pending=True)
    assert integrity.is_pending(half) and aliases_of(reg, "fresh") == {"production": 1}
    with pytest.raises(IncompleteVersionError):
        load_version(reg, "fresh", "@production")
    report = integrity.repair(reg, "fresh")
    assert report.deleted == [("fresh", 1)]
    assert aliases_of(reg, "fresh") == {} and ledger.production_history(reg, "fresh") == []
    out = cli(lineage, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [int(v.version) for v in versions_of(reg, "fresh")] == [2, 3] and aliases_of(reg, "fresh")["production"] == 3
    assert ledger.production_history(reg, "fresh") == [2, 3]
    consistent("fresh")


def test_repair_leaves_live_work_alone(lineage):
    """A pending version and a RUNNING run of a live process (this one) are not touched."""
    import mlflow

    reg = Registry()
    c = reg.client
    with mlflow.start_run(experiment_id=reg.ensure_experiment()) as run:
        integrity.claim_run()
        assert run.info.run_id not in integrity.repair(reg, "tiny", grace_s=0, run_grace_s=0).failed_runs
        assert c.get_run(run.info.run_id).info.status == "RUNNING"
    assert integrity.REGISTRAR_TAG not in c.get_model_version("tiny", "2").tags  # cleared on completion
    c.set_model_version_tag("tiny", "2", integrity.PENDING_TAG, "1")
    c.set_model_version_tag("tiny", "2", integrity.REGISTRAR_TAG, integrity.owner())
    try:
        assert integrity.repair(reg, "tiny", grace_s=0).deleted == []
        assert 2 not in {int(v.version) for v in versions_of(reg, "tiny")}
    finally:
        c.delete_model_version_tag("tiny", "2", integrity.PENDING_TAG)
        c.delete_model_version_tag("tiny", "2", integrity.REGISTRAR_TAG)  # a completed version has none
    assert 2 in {int(v.version) for v in versions_of(reg, "tiny")}


# --------------------------------------------------------------------------- concurrency


def concurrent_first_edits(ws: dict, name: str, n: int = 4) -> tuple[list[int], list[str]]:
    """``n`` CLI edits of the new registered model ``name`` started at once: exit codes, stderr tails.
    Each process has its own temporary folder, as processes on different hosts would: nothing but
    the shared store may serialise them."""
    cmd = [sys.executable, "-m", "editflow.cli", *edit_args(ws, name=name, model=str(ws["model"]))]
    procs = []
    for i in range(n):
        tmp = ws["root"] / f"host-{name}-{i}"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITFLOW_QUIET": "1", "TMPDIR": str(tmp)}
        procs.append(
            subprocess.Popen(cmd, cwd=ws["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=900) for p in procs]
    return [p.returncode for p in procs], [err[-2000:] for _, err in outs]


@pytest.mark.slow
def test_concurrent_first_edits_land_as_distinct_versions(lineage):
    """Four edits of a new registered model at once: one base, four edits, a consistent ledger."""
    reg = Registry()
    codes, errors = concurrent_first_edits(lineage, "conc")
    assert codes == [0] * 4, errors
    versions = versions_of(reg, "conc")
    assert [int(v.version) for v in versions] == [1, 2, 3, 4, 5]
    assert [v.tags["editflow.role"] for v in versions] == ["base"] + ["edit"] * 4
    registered = sorted(e.version for e in ledger.events(reg, "conc") if e.action == "register")
    assert registered == [1, 2, 3, 4, 5]
    assert all(len(ledger.own_facts(reg, "conc", v)) == 1 for v in (2, 3, 4, 5))
    promotes = [e for e in ledger.events(reg, "conc") if e.action == "promote"]
    assert [e.previous_version for e in promotes] == [None] + [e.version for e in promotes[:-1]]
    assert sorted(e.version for e in promotes) == [1, 2, 3, 4, 5]
    consistent("conc")


# --------------------------------------------------------------------------- leftovers: files of discarded versions


def tree(path: Path) -> dict[str, int]:
    """Size of every file under ``path``, by relative path."""
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_repair_deletes_the_files_of_an_abandoned_version(lineage):
    """A kill after registration leaves a pending version with its model files written: repair deletes
    the version, its files and its logged model; the other versions' files stay and still verify."""
    reg = Registry()
    kept = {int(v.version): artifact_dir("tiny", int(v.version)) for v in versions_of(reg, "tiny")}
    before = {v: tree(path) for v, path in kept.items()}
    out = cli(lineage, *edit_args(lineage), crash="after_register_model")
    assert out.returncode == -9, out.stderr[-2000:]
    [half] = [v for v in versions_of(reg, "tiny", include_pending=True) if int(v.version) not in kept]
    files = artifact_dir("tiny", int(half.version))
    assert integrity.is_pending(half) and {"editflow.json", "edited.safetensors"} <= set(tree(files))
    model_id = half.source.removeprefix("models:/")
    assert model_id.startswith("m-") and reg.client.get_logged_model(model_id).artifact_location == files.as_uri()

    repaired = cli(lineage, "verify", "tiny", "--repair")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert f"repair: deleted incomplete version tiny {half.version}" in repaired.stdout
    assert "could not delete" not in repaired.stdout
    assert int(half.version) not in {int(v.version) for v in versions_of(reg, "tiny", include_pending=True)}
    assert not files.exists() or tree(files) == {}
    with pytest.raises(Exception, match="(?i)not found"):  # a deleted logged model is not found
        reg.client.get_logged_model(model_id)
    assert {v: tree(path) for v, path in kept.items()} == before
    for v in kept:
        checked = cli(lineage, "verify", "tiny", str(v))
        assert checked.returncode == 0, checked.stderr[-2000:]
    consistent("tiny")


def test_files_that_cannot_be_deleted_are_reported_not_raised(ws):
    """Repair still deletes a version whose files cannot be deleted, and says so."""
    reg = Registry()
    c = reg.client
    c.create_registered_model("leftover")
    c.create_model_version("leftover", "nosuchstore://bucket/model", tags={integrity.PENDING_TAG: "1"})
    report = integrity.repair(reg, "leftover", grace_s=0)
    assert report.deleted == [("leftover", 1)] and versions_of(reg, "leftover", include_pending=True) == []
    [(name, version, what)] = report.leftovers
    assert (name, version) == ("leftover", 1) and "nosuchstore://bucket/model" in what
    assert report.lines()[1].startswith("deleted version leftover 1: could not delete files at nosuchstore://")
