"""The registry workflow on real database servers, PostgreSQL and MySQL (Debian's MariaDB): for each,
one fresh database per module, used as MLflow's tracking and registry store and as editflow's ledger,
reached through a plain ``postgresql://`` or ``mysql://`` URI.

Needs ``EDITFLOW_TEST_POSTGRES_URI`` / ``EDITFLOW_TEST_MYSQL_URI`` (a user allowed to create
databases); CI sets them from ``bash .ci/postgres.sh start`` and ``bash .ci/mysql.sh start``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from test_integrity import concurrent_first_edits, consistent, edit_args
from test_workflow import InjectedFailure, fail_after, job, make_workspace, state_hash

from editflow.pipeline import run_edit
from editflow.registry import ledger, promotion
from editflow.registry.store import Registry, sqlalchemy_uri
from editflow.registry.versions import aliases_of, load_version, versions_of
from editflow.requests import RequestError

#: backend -> (the variable naming its server, the start command, the driver a plain URI gets).
BACKENDS = {
    "postgresql": ("EDITFLOW_TEST_POSTGRES_URI", "bash .ci/postgres.sh start", "psycopg"),
    "mysql": ("EDITFLOW_TEST_MYSQL_URI", "bash .ci/mysql.sh start", "pymysql"),
}

pytestmark = pytest.mark.slow


def admin(server: str):
    """An autocommit engine on the server's own test database (CREATE/DROP DATABASE need autocommit)."""
    return create_engine(sqlalchemy_uri(server), isolation_level="AUTOCOMMIT")


def quoted(backend: str, name: str) -> str:
    return f"`{name}`" if backend == "mysql" else f'"{name}"'


@pytest.fixture(scope="module", params=list(BACKENDS))
def ws(request, tmp_path_factory):
    backend = request.param
    variable, start, driver = BACKENDS[backend]
    server_uri = os.environ.get(variable)
    if not server_uri:
        pytest.skip(f'needs {backend}: export {variable}="$({start})" (a URI whose user may create databases)')
    name = f"editflow_{uuid.uuid4().hex[:12]}"
    server = admin(server_uri)
    with server.connect() as c:
        c.execute(text(f"CREATE DATABASE {quoted(backend, name)}"))
    uri = make_url(server_uri).set(database=name).render_as_string(hide_password=False)
    assert uri.startswith(f"{backend}://"), "the tests use a plain URI"

    root = tmp_path_factory.mktemp(backend)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("EDITFLOW_CACHE", str(root / "cache"))
    mp.setenv("EDITFLOW_ACTOR", "tester")
    mp.delenv("EDITFLOW_LEDGER_URI", raising=False)
    # MLflow creates its schema on first use; a team database is set up once, not by four clients at once
    from mlflow import MlflowClient

    MlflowClient(sqlalchemy_uri(uri)).search_experiments()
    paths = make_workspace(root)
    paths.update(root=root, uri=uri, database=name, backend=backend, driver=driver)
    yield paths
    ledger.engine(Registry()).dispose()  # before the environment goes back: the store's URI is in it
    ledger._engine_for.cache_clear()
    mp.undo()
    force = " WITH (FORCE)" if backend == "postgresql" else ""
    with server.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {quoted(backend, name)}{force}"))
    server.dispose()


def test_edit_promote_rollback(ws):
    """Its own registered model, so the version numbers do not depend on the order of the tests."""
    import mlflow

    reg = Registry()
    # the store is under test here, not the gate
    first = run_edit(job(ws, promote="always", registered_model="pg-lineage"))
    assert (first.version, first.parent_version, first.promoted) == (2, 1, True)
    # MLflow and the ledger really are on the server, through the extra's driver, in the same database.
    backend, driver = ws["backend"], ws["driver"]
    assert mlflow.get_tracking_uri().startswith(f"{backend}+{driver}://")
    assert mlflow.get_registry_uri() == mlflow.get_tracking_uri()
    eng = ledger.engine(reg)
    assert (eng.dialect.name, eng.dialect.driver, eng.url.database) == (backend, driver, ws["database"])
    tables = set(inspect(eng).get_table_names())
    assert {"editflow_facts", "editflow_events", "editflow_locks", "registered_models", "model_versions"} <= tables

    v1_hash = state_hash(load_version(reg, "pg-lineage", 1, device="cpu").handle.model)
    v2_hash = state_hash(load_version(reg, "pg-lineage", 2, device="cpu").handle.model)
    second = run_edit(
        job(
            ws,
            requests=str(ws["more"]),
            model="models:/pg-lineage@production",
            promote="always",
            registered_model="pg-lineage",
        )
    )
    assert (second.version, second.parent_version, second.promoted) == (3, 2, True)
    assert [int(v.version) for v in versions_of(reg, "pg-lineage")] == [1, 2, 3]
    assert len(ledger.held_facts(reg, "pg-lineage", 3)) == 3
    consistent("pg-lineage")

    assert promotion.rollback(reg, "pg-lineage")["version"] == 2
    assert state_hash(load_version(reg, "pg-lineage", "@production", device="cpu").handle.model) == v2_hash
    consistent("pg-lineage")
    assert promotion.rollback(reg, "pg-lineage")["version"] == 1
    assert state_hash(load_version(reg, "pg-lineage", "@production", device="cpu").handle.model) == v1_hash
    consistent("pg-lineage")
    promotion.promote(reg, "pg-lineage", 3, reason="back to the newest")
    assert aliases_of(reg, "pg-lineage")["production"] == 3
    stages = {int(v.version): v.current_stage for v in reg.client.search_model_versions("name='pg-lineage'")}
    assert stages[3] == "Production" and stages[1] == "Archived"
    assert ledger.production_history(reg, "pg-lineage") == [1, 3]
    actions = [
        (e.action, e.version, e.previous_version) for e in ledger.events(reg, "pg-lineage") if e.action != "register"
    ]
    assert actions[-3:] == [("rollback", 2, 3), ("rollback", 1, 2), ("promote", 3, 1)]
    consistent("pg-lineage")


def test_concurrent_first_edits(ws):
    """Four CLI edits of a new registered model at once: one base, four distinct edits, a consistent ledger."""
    reg = Registry()
    codes, errors = concurrent_first_edits(ws, "conc")
    # 0: registered and promoted; 3: registered, but the gate kept it a candidate.
    assert all(code in (0, 3) for code in codes), errors
    versions = versions_of(reg, "conc")
    assert [int(v.version) for v in versions] == [1, 2, 3, 4, 5]
    assert [v.tags["editflow.role"] for v in versions] == ["base"] + ["edit"] * 4
    assert sorted(e.version for e in ledger.events(reg, "conc") if e.action == "register") == [1, 2, 3, 4, 5]
    assert all(len(ledger.own_facts(reg, "conc", v)) == 1 for v in (2, 3, 4, 5))
    promotes = [e for e in ledger.events(reg, "conc") if e.action == "promote"]
    assert [e.previous_version for e in promotes] == [None] + [e.version for e in promotes[:-1]]
    consistent("conc")


#: One process of the dataset race: a run of its own, then the request file logged as the run's
#: dataset the moment the parent says go.
_LOG_DATASET = """
import sys, time
from pathlib import Path
import mlflow
from editflow.pipeline import _log_dataset
from editflow.registry.store import Registry
from editflow.requests import load_requests

root, i = Path(sys.argv[1]), sys.argv[2]
requests = load_requests(sys.argv[3])
mlflow.set_experiment(experiment_id=Registry().ensure_experiment("dataset-race"))
with mlflow.start_run() as run:
    (root / f"ready-{i}").write_text(run.info.run_id)
    while not (root / "go").exists():
        time.sleep(0.005)
    _log_dataset(sys.argv[3], requests)
"""


def test_concurrent_runs_log_one_request_file(ws):
    """Edits of one request file started together all log it: the store's lookup-then-insert of the
    dataset races, and the losing process must not fail its edit over it."""

    root, n = ws["root"] / "dataset-race", 6
    root.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _LOG_DATASET, str(root)]
    procs = [
        subprocess.Popen([*cmd, str(i), str(ws["facts"])], env=env, stderr=subprocess.PIPE, text=True) for i in range(n)
    ]
    while len(list(root.glob("ready-*"))) < n and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (root / "go").touch()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e[-1500:] for e in errors if e]
    client = Registry().client
    runs = [client.get_run((root / f"ready-{i}").read_text()) for i in range(n)]
    datasets = [[d.dataset for d in run.inputs.dataset_inputs] for run in runs]
    assert [[d.name for d in ds] for ds in datasets] == [["facts.json"]] * n
    assert len({d.digest for ds in datasets for d in ds}) == 1


def test_failed_runs_leave_no_version(ws, monkeypatch):
    from mlflow import MlflowClient

    reg = Registry()
    if "tiny" not in {m.name for m in reg.client.search_registered_models()}:
        run_edit(job(ws, promote="always"))  # run alone: give it a production version first
    before, prod = len(versions_of(reg, "tiny")), aliases_of(reg, "tiny")["production"]
    with pytest.raises(RequestError, match="does not exist"):
        run_edit(job(ws, requests=str(ws["root"] / "missing.json")))
    bad = ws["root"] / "bad.json"
    bad.write_text(json.dumps([{"prompt": "no placeholder", "subject": "x", "target_new": "y"}]))
    with pytest.raises(RequestError, match="record 0"):
        run_edit(job(ws, requests=str(bad), model="models:/tiny@production"))
    with monkeypatch.context() as mp, pytest.raises(InjectedFailure):
        fail_after(mp, "log")
        run_edit(job(ws, model="models:/tiny@production", promote="always"))
    # a failure after MLflow registered the version (the ledger is unreachable): the version is deleted
    monkeypatch.setenv("EDITFLOW_LEDGER_URI", "sqlite:////nonexistent-dir/ledger.db")
    with pytest.raises(OperationalError):
        run_edit(job(ws, model="models:/tiny@production", promote="always"))
    monkeypatch.delenv("EDITFLOW_LEDGER_URI")
    args = edit_args(ws, name="tiny")
    args[1] = "missing.json"
    missing = subprocess.run(
        [sys.executable, "-m", "editflow.cli", *args],
        cwd=ws["root"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "EDITFLOW_QUIET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr[-2000:]
    assert len(versions_of(reg, "tiny")) == before and aliases_of(reg, "tiny")["production"] == prod
    assert reg.client.get_model_version("tiny", str(prod)).current_stage == "Production"
    latest = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert latest[0].info.status == "FAILED"
    consistent("tiny")
