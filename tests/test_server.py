"""The registry workflow on a remote MLflow tracking server whose artifacts live in S3, as a team runs
it: every command through the CLI with ``MLFLOW_TRACKING_URI=http://...``, each client in a folder of
its own and without S3 credentials (the server proxies artifacts), the ledger in a shared SQL
database (``EDITFLOW_LEDGER_URI``: PostgreSQL when ``EDITFLOW_TEST_POSTGRES_URI`` is set, else sqlite).

The server is ``EDITFLOW_TEST_SERVER_URI`` with its S3 endpoint ``EDITFLOW_TEST_S3_ENDPOINT`` (CI sets
both from ``bash .ci/mlflow_server.sh``), else one this module starts with that script (moto's S3
server comes with the ``test`` extra); the test of a server killed in the middle of a registration
always starts a private one. Skipped when no server can be had; a failure instead with
``EDITFLOW_REQUIRE_SERVER=1``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _processes import free_port
from click.testing import CliRunner, Result

from editflow.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "mlflow_server.sh"
BUCKET = "editflow"  # .ci/mlflow_server.sh: s3://editflow/artifacts is the server's artifact destination
FACTS = json.loads((REPO / "examples" / "facts.json").read_text())
MODEL = str(REPO / "editflow" / "assets" / "default_model")  # the bundled default model
#: The bundled model's own hyperparameters; statistics of 2,000 tokens and no fluency keep it fast.
FAST = ("--stats-tokens", "2000", "--no-fluency")
#: Model names of this session: a server given by EDITFLOW_TEST_SERVER_URI may outlive one test run.
SESSION = uuid.uuid4().hex[:6]
#: A client of the team server holds no S3 credentials and knows no S3 endpoint.
NO_S3: dict[str, str | None] = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "MLFLOW_S3_ENDPOINT_URL": None,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
LOCAL_STORES = ("mlflow.db", "mlruns", "mlartifacts", "editflow-ledger.db")


def unavailable(reason: str) -> None:
    """Skip, or fail where CI requires the server tests (``EDITFLOW_REQUIRE_SERVER=1``)."""
    if os.environ.get("EDITFLOW_REQUIRE_SERVER") == "1":
        pytest.fail(f"EDITFLOW_REQUIRE_SERVER=1, but {reason}", pytrace=False)
    pytest.skip(reason)


def bin_path() -> str:
    """PATH with this interpreter's scripts (moto_server, mlflow) first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def script(root: Path, command: str) -> str:
    """``bash .ci/mlflow_server.sh COMMAND`` for the instance kept in ``root``; its stdout."""
    env = {**os.environ, "EDITFLOW_MLFLOW_ROOT": str(root), "PYTHON": sys.executable, "PATH": bin_path()}
    out = subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f".ci/mlflow_server.sh {command} failed:\n{out.stderr[-3000:]}"
    return out.stdout.strip()


def s3_prefix(artifact_uri: str) -> str:
    """The bucket prefix of a proxied artifact URI: ``mlflow-artifacts:/1/x`` -> ``artifacts/1/x/``."""
    scheme, path = artifact_uri.split(":", 1)
    assert scheme == "mlflow-artifacts", artifact_uri
    return f"artifacts/{path.strip('/')}/"


@dataclass
class Server:
    """A tracking server and the S3 endpoint of its artifact store."""

    uri: str
    s3_endpoint: str
    root: Path | None = None  # its .ci/mlflow_server.sh state, when this module started it

    def s3(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def objects(self, prefix: str) -> dict[str, int]:
        """Size of every object under ``prefix`` in the bucket, by key relative to it."""
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return {o["Key"][len(prefix) :]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read()).hexdigest()

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def pgid(self) -> int:
        """The tracking server's process group (a server this module started)."""
        assert self.root is not None
        return int((self.root / "mlflow.pid").read_text())


def start_server(root: Path) -> Server:
    if sys.platform != "linux" or not all(shutil.which(b, path=bin_path()) for b in ("moto_server", "mlflow")):
        unavailable("needs Linux, moto's S3 server and mlflow (pip install -e '.[test]')")
    return Server(script(root, "start"), script(root, "s3"), root)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    uri = os.environ.get("EDITFLOW_TEST_SERVER_URI")
    if uri:
        endpoint = os.environ.get("EDITFLOW_TEST_S3_ENDPOINT")
        if not endpoint:
            pytest.fail("EDITFLOW_TEST_SERVER_URI needs EDITFLOW_TEST_S3_ENDPOINT (bash .ci/mlflow_server.sh s3)")
        yield Server(uri.rstrip("/"), endpoint)
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    try:
        yield start_server(root)
    finally:
        script(root, "stop")


@pytest.fixture(scope="module")
def ledger_uri(tmp_path_factory) -> Iterator[str]:
    """The team's ledger: a fresh PostgreSQL database when the suite has a server, else a sqlite file
    in a folder no client works in."""
    pg = os.environ.get("EDITFLOW_TEST_POSTGRES_URI")
    if not pg:
        yield f"sqlite:///{tmp_path_factory.mktemp('shared') / 'ledger.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"editflow_ledger_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(pg).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:  # FORCE: the in-process clients' engines may still hold connections
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One statistics and wheel cache for every client of this module, as on one machine."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def _mlflow_uris_back() -> Iterator[None]:
    """In-process commands point MLflow's fluent API at the server: point it back for later modules."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


class Client:
    """One member of the team: a folder of their own, the server's URI, the shared ledger (``None``: no
    ledger named), a statistics cache, no S3 credentials. Calls run the CLI in this process (click's
    runner); :meth:`popen` runs it as a process of its own."""

    def __init__(self, folder: Path, server_uri: str, ledger: str | None, cache: Path, **env: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.env: dict[str, str | None] = {
            "MLFLOW_TRACKING_URI": server_uri,
            "EDITFLOW_LEDGER_URI": ledger,
            "EDITFLOW_CACHE": str(cache),
            "EDITFLOW_ACTOR": folder.name,
            "EDITFLOW_QUIET": "1",
            "OMP_NUM_THREADS": "1",
            **NO_S3,
            **env,
        }

    def write(self, name: str, facts: list[dict]) -> None:
        (self.folder / name).write_text(json.dumps(facts))

    def __call__(self, *args: str) -> Result:
        cwd = Path.cwd()
        os.chdir(self.folder)
        try:
            return CliRunner().invoke(main, list(args), env=self.env, catch_exceptions=False)
        finally:
            os.chdir(cwd)

    def json(self, *args: str, code: int = 0) -> dict:
        out = self(*args, "--json")
        assert out.exit_code == code, out.stderr[-3000:]
        return json.loads(out.stdout)

    def process_env(self, **extra: str) -> dict[str, str]:
        return {k: v for k, v in {**os.environ, **self.env, **extra}.items() if v is not None}

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "editflow.cli", *args],
            cwd=self.folder,
            env=self.process_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def one_error(stderr: str) -> str:
    """The one ``error:`` line of a failed command (MLflow may log other lines; no traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def only_requests(client: Client) -> None:
    """Nothing of the store in a client's folder: no local tracking store, artifacts or ledger."""
    assert not [n for n in LOCAL_STORES if (client.folder / n).exists()]
    assert all(p.suffix == ".json" for p in client.folder.iterdir()), list(client.folder.iterdir())


@dataclass
class Flow:
    name: str
    alice: Client
    bob: Client
    first: dict  # alice's edit --json: version 2, promoted
    second: dict  # bob's edit --json from production: version 3, kept a candidate by the gate
    promoted: dict  # bob's promote 3 --json
    rolled_back: dict  # alice's rollback --json


@pytest.fixture(scope="module")
def flow(server, ledger_uri, cache, tmp_path_factory) -> Flow:
    """Alice edits three facts into the bundled model (v1 base, v2, promoted); Bob, in another folder,
    edits two more on production with a gate that cannot pass (v3, candidate, exit 3) and promotes v3
    anyway; Alice rolls production back (to v2)."""
    home = tmp_path_factory.mktemp("clients")
    alice = Client(home / "alice", server.uri, ledger_uri, cache)
    bob = Client(home / "bob", server.uri, ledger_uri, cache)
    name = f"team-{SESSION}"
    alice.write("facts.json", FACTS[:3])
    bob.write("more.json", FACTS[3:5])
    first = alice.json("edit", "facts.json", "--model", MODEL, "--registered-model", name, "--promote", "always", *FAST)
    second = bob.json(
        "edit", "more.json", "--model", f"models:/{name}@production", "--min-efficacy", "101", *FAST, code=3
    )
    return Flow(name, alice, bob, first, second, bob.json("promote", name, "3"), alice.json("rollback", name))


def test_edit_versions_facts_compare_promote_rollback(server, flow):
    name, alice, bob = flow.name, flow.alice, flow.bob
    first, second = flow.first, flow.second
    assert (first["name"], first["version"], first["parent_version"], first["promoted"]) == (name, 2, 1, True)
    assert first["metrics"]["pre/efficacy"] == 0.0 and first["metrics"]["post/efficacy"] == 100.0
    assert first["metrics"]["post/n_facts"] == 3.0
    assert (second["version"], second["parent_version"], second["promoted"]) == (3, 2, False)
    assert second["metrics"]["pre/efficacy"] == 0.0 and second["metrics"]["post/efficacy"] == 100.0
    assert not second["gate"]["passed"] and any("efficacy" in r for r in second["gate"]["reasons"])
    assert second["metrics"]["post/retention"] == 100.0  # alice's three facts, on top of which bob edited

    rows = bob.json("versions", name)["versions"]
    assert [(r["version"], r["role"], r["parent"], r["facts"], r["new_facts"]) for r in rows] == [
        (1, "base", None, 0, 0),
        (2, "edit", 1, 3, 3),
        (3, "edit", 2, 5, 2),
    ]
    assert [sorted(r["aliases"]) for r in rows] == [[], ["production"], ["candidate"]]
    assert rows[1]["metrics"]["efficacy"] == 100.0 and rows[2]["metrics"]["efficacy"] == 100.0

    assert alice.json("facts", name, "--subject", "kalyan")["facts"] == [{"version": 2, **FACTS[2]}]
    assert alice.json("facts", name, "--subject", "Cutie Honey")["facts"] == [{"version": 3, **FACTS[4]}]
    diff = alice.json("compare", name, "2", "3")
    assert (diff["a"], diff["b"], diff["only_a"]) == (2, 3, [])
    assert diff["only_b"] == [{"version": 3, **f} for f in FACTS[3:5]]
    assert diff["metrics"]["efficacy"] == {"a": 100.0, "b": 100.0, "delta": 0.0}

    assert flow.promoted == {"name": name, "version": 3, "previous": 2, "action": "promote"}
    assert flow.rolled_back == {"name": name, "version": 2, "previous": 3, "action": "rollback"}
    model = server.client().get_registered_model(name)
    assert model.aliases == {"production": "2", "candidate": "3"}
    stages = {int(v.version): v.current_stage for v in server.client().search_model_versions(f"name='{name}'")}
    assert [v for v, stage in stages.items() if stage == "Production"] == [2]
    only_requests(alice)
    only_requests(bob)


def test_artifacts_are_in_the_bucket(server, flow):
    """Models and run artifacts went through the server's proxy into S3 (the clients have no S3
    credentials), byte for byte as the registry recorded them."""
    name, client = flow.name, server.client()
    expected = {1: {"MLmodel", "editflow.json", "weights/model.safetensors"}, 2: {"MLmodel", "edited.safetensors"}}
    expected[3] = expected[2]
    for version, files in expected.items():
        uri = client.get_model_version_download_uri(name, str(version))
        assert files <= set(server.objects(s3_prefix(uri))), (version, uri)
    checked = flow.bob.json("verify", name, "3")["checked"]
    assert [c["version"] for c in checked] == [3, 1]
    for c in checked:
        assert c["files"], c
        for rel, sha in c["files"].items():
            assert server.sha256(s3_prefix(c["uri"]) + rel) == sha, (c["uri"], rel)
    run = client.get_run(flow.first["run_id"])
    logged = server.objects(s3_prefix(run.info.artifact_uri))
    assert {"inputs/facts.json", "eval/facts.json", "eval/facts.csv", "lineage/facts.jsonl"} <= set(logged)
    assert any(k.startswith("stats/") and k.endswith(".manifest.json") for k in logged)
    sent = (flow.alice.folder / "facts.json").read_bytes()
    assert server.sha256(s3_prefix(run.info.artifact_uri) + "inputs/facts.json") == hashlib.sha256(sent).hexdigest()
    if server.root is not None:  # a server of this module: nothing kept beside its database
        assert not (server.root / "mlartifacts").exists()


def test_two_clients_share_the_ledger_and_a_remote_server_needs_one(server, flow, cache, tmp_path):
    name, alice, bob = flow.name, flow.alice, flow.bob
    for subject in ("Macleod", "La Gomera"):
        assert alice.json("facts", name, "--subject", subject) == bob.json("facts", name, "--subject", subject)
    for version in ("1", "2", "3"):
        assert alice.json("show", name, version) == bob.json("show", name, version)
    events = {v: alice.json("show", name, str(v))["events"] for v in (1, 2, 3)}
    assert [(e["action"], e["actor"]) for e in events[3]][:2] == [("register", "bob"), ("promote", "bob")]
    assert [(e["action"], e["actor"], e["previous"]) for e in events[2]][-1] == ("rollback", "alice", 3)
    assert alice.json("versions", name) == bob.json("versions", name)

    # Carol names no ledger: every command that needs it refuses, naming the server and the setting,
    # and nothing is registered, moved or written in her folder.
    carol = Client(tmp_path / "carol", server.uri, None, cache)
    carol.write("facts.json", FACTS[:1])
    other = f"team-noledger-{SESSION}"
    for args in (
        ("facts", name, "--subject", "Macleod"),
        ("promote", name, "3"),
        ("rollback", name),
        ("edit", "facts.json", "--model", MODEL, "--registered-model", other, *FAST),
    ):
        out = carol(*args)
        assert out.exit_code == 1 and out.stdout == "", (args, out.output[-3000:])
        line = one_error(out.stderr)
        assert server.uri in line and "EDITFLOW_LEDGER_URI" in line, line
    # refused before any work: no run, base or upload on the server
    assert server.client().search_registered_models(f"name='{other}'") == []
    assert server.client().get_experiment_by_name(other) is None
    assert server.client().get_registered_model(name).aliases["production"] == "2"
    only_requests(carol)


#: Concurrent edit processes (each pays an interpreter with torch and MLflow: two fit a small CI machine).
CONCURRENT = 2


def test_concurrent_edits_land_as_distinct_versions(server, ledger_uri, cache, tmp_path):
    """First edits of a new registered model at once, each a process in a folder of its own: one base,
    one version per edit with its own fact; the ledger's production history is one chain."""
    name = f"team-concurrent-{SESSION}"
    devs = [Client(tmp_path / f"dev{i}", server.uri, ledger_uri, cache) for i in range(CONCURRENT)]
    for i, dev in enumerate(devs):
        dev.write("fact.json", [FACTS[5 + i]])
    args = ("edit", "fact.json", "--model", MODEL, "--registered-model", name, "--promote", "always", "--json", *FAST)
    procs = [dev.popen(*args) for dev in devs]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * CONCURRENT, [err[-2000:] for _, err in outs]
    docs = [json.loads(out) for out, _ in outs]
    edits = list(range(2, CONCURRENT + 2))
    assert sorted(d["version"] for d in docs) == edits
    assert all(d["parent_version"] == 1 and d["promoted"] for d in docs)

    rows = devs[0].json("versions", name)["versions"]
    assert [(r["version"], r["role"], r["new_facts"]) for r in rows] == [(1, "base", 0)] + [
        (v, "edit", 1) for v in edits
    ]
    shown = {v: devs[0].json("show", name, str(v)) for v in [1, *edits]}
    for i, d in enumerate(docs):
        assert [f["subject"] for f in shown[d["version"]]["facts"]] == [FACTS[5 + i]["subject"]]
        assert [e["actor"] for e in shown[d["version"]]["events"] if e["action"] == "register"] == [f"dev{i}"]
    (base_registrar,) = [e["actor"] for e in shown[1]["events"] if e["action"] == "register"]
    assert base_registrar in {dev.folder.name for dev in devs}
    promotes = sorted(
        ((s["version"], e) for s in shown.values() for e in s["events"] if e["action"] == "promote"),
        key=lambda ve: ve[1]["time"],
    )
    assert [v for v, _ in promotes][0] == 1 and sorted(v for v, _ in promotes[1:]) == edits
    assert [e["previous"] for _, e in promotes] == [None] + [v for v, _ in promotes[:-1]]
    client = server.client()
    assert client.get_registered_model(name).aliases["production"] == str(promotes[-1][0])
    registered = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in registered) == [1, *edits]
    assert not [v.version for v in registered if "editflow.pending" in v.tags]
    for v in edits:
        assert "edited.safetensors" in server.objects(s3_prefix(client.get_model_version_download_uri(name, str(v))))
    for dev in devs:
        only_requests(dev)


#: ``python -c KILL_SERVER_AT ARGS``: the CLI, where the crash hook named by
#: ``EDITFLOW_TEST_KILL_SERVER_AT`` (``step`` or ``step#n``: its n-th time) SIGKILLs the tracking
#: server's process group instead of this process, waits until the port refuses, and carries on.
KILL_SERVER_AT = r"""
import os, signal, socket, sys, time
from editflow.registry import integrity
from editflow.cli import main

step, _, nth = os.environ.pop("EDITFLOW_TEST_KILL_SERVER_AT").partition("#")
pgid, port = int(os.environ.pop("EDITFLOW_TEST_SERVER_PGID")), int(os.environ["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
seen = []

def kill_server(name):
    if name != step:
        return
    seen.append(name)
    if len(seen) != int(nth or 1):
        return
    os.killpg(pgid, signal.SIGKILL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.1)
    print("test: tracking server killed at", name, "#", len(seen), file=sys.stderr, flush=True)

integrity.crashpoint = kill_server
sys.argv[0] = "editflow"
main()
"""


def test_server_killed_mid_registration(cache, tmp_path):
    """The tracking server dies after it registered the edit's version (the version is still pending):
    the edit fails with one line naming the server; once it is back, nothing half-registered is
    visible, production is where it was, and repair deletes the pending version and fails the run."""
    srv = start_server(tmp_path / "server")
    try:
        name = f"team-crash-{SESSION}"
        # no retries: MLflow's default backoff would wait minutes for a server that is gone
        dev = Client(
            tmp_path / "dev",
            srv.uri,
            f"sqlite:///{tmp_path / 'ledger.db'}",
            cache,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        )
        dev.write("facts.json", FACTS[:2])
        env = dev.process_env(
            EDITFLOW_TEST_KILL_SERVER_AT="after_register_model#2",  # #1: the base, #2: the edit
            EDITFLOW_TEST_SERVER_PGID=str(srv.pgid()),
        )
        args = ("edit", "facts.json", "--model", MODEL, "--registered-model", name, "--promote", "always", *FAST)
        out = subprocess.run(
            [sys.executable, "-c", KILL_SERVER_AT, *args, "--json"],
            cwd=dev.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert "tracking server killed at after_register_model # 2" in out.stderr, out.stderr[-3000:]
        assert out.returncode == 1 and out.stdout == "", out.stderr[-3000:]
        line = one_error(out.stderr)
        assert line.startswith(f"error: tracking server {srv.uri} is unreachable"), line

        assert script(srv.root, "start") == srv.uri  # back: same port, database and bucket
        client = srv.client()
        tags = {int(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
        assert sorted(tags) == [1, 2] and "editflow.pending" in tags[2] and "editflow.pending" not in tags[1]
        rows = dev.json("versions", name)["versions"]
        assert [(r["version"], r["aliases"], r["stage"]) for r in rows] == [(1, ["production"], "Production")]
        shown = dev("show", name, "2")
        assert shown.exit_code == 1 and "version 2" in one_error(shown.stderr)
        assert client.get_registered_model(name).aliases == {"production": "1"}
        assert dev.json("facts", name, "--subject", FACTS[0]["subject"])["facts"] == []
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert run.info.status == "RUNNING"  # the client could not end it: the server was gone

        # the pending version's model files are in the bucket until repair deletes them (the base's stay)
        sources = {int(v.version): v.source for v in client.search_model_versions(f"name='{name}'")}
        half, base = (
            s3_prefix(client.get_logged_model(sources[v][len("models:/") :]).artifact_location) for v in (2, 1)
        )
        base_files = srv.objects(base)
        assert "editflow.json" in srv.objects(half) and "editflow.json" in base_files

        repaired = dev.json("verify", name, "--repair")["repaired"]
        assert repaired == [f"deleted incomplete version {name} 2", f"marked orphaned run {run.info.run_id} FAILED"]
        assert srv.objects(half) == {} and srv.objects(base) == base_files
        assert [int(v.version) for v in client.search_model_versions(f"name='{name}'")] == [1]
        assert client.get_run(run.info.run_id).info.status == "FAILED"
        assert client.get_registered_model(name).aliases == {"production": "1"}
        only_requests(dev)
    finally:
        script(srv.root, "stop")


@pytest.mark.parametrize(
    "args",
    [
        ("edit", "facts.json", "--model", MODEL, "--registered-model", "team", *FAST),
        ("versions", "team"),
        ("facts", "team", "--subject", "Macleod"),
        ("compare", "team", "1", "2"),
        ("promote", "team", "2"),
        ("rollback", "team"),
    ],
    ids=lambda a: a[0],
)
def test_unreachable_server_is_one_error_line(args, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dev = Client(tmp_path / "dev", uri, f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path / "cache")
    dev.write("facts.json", FACTS[:1])
    start = time.monotonic()
    out = dev(*args)
    assert time.monotonic() - start < 10
    assert out.exit_code == 1 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: tracking server {uri} is unreachable (ConnectionError)"), line
    only_requests(dev)


def test_silent_server_is_named_after_the_probe(tmp_path):
    """A port that accepts connections and never answers: named after the 5-second probe."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        dev = Client(tmp_path / "dev", uri, f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path / "cache")
        dev.write("facts.json", FACTS[:1])
        start = time.monotonic()
        out = dev("edit", "facts.json", "--model", MODEL, "--registered-model", "team", *FAST)
        assert 4 < time.monotonic() - start < 15
    assert out.exit_code == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"error: tracking server {uri} is unreachable (ReadTimeout)"]
    only_requests(dev)
