"""The registry commands as a user sees them, on a real sqlite store: ``--json`` documents, one-line
``error:`` reports with documented exit codes, help text for every option, ``editflow ui`` on any
tracking URI, and logged models whose requirements pip can install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click
import pytest
from _processes import free_port, stop_group, wait_healthy
from click.testing import CliRunner
from test_workflow import LOOSE, make_workspace

from editflow.cli import main
from editflow.commands import _options
from editflow.commands._options import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE, mask_uri
from editflow.registry.store import Registry

FACT_KEYS = {"version", "subject", "prompt", "target_new", "target_true"}
JSON_COMMANDS = ("versions", "compare", "facts", "show", "promote", "rollback")
MY_COMMANDS = (*JSON_COMMANDS, "ui", "export", "init", "eval")
DEFAULT = "editflow-default"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store where ``editflow init`` registered editflow-default version 1, and a workspace
    (tiny model, corpus, request files) in the working directory."""
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("EDITFLOW_CACHE", str(root / "cache"))
    mp.setenv("EDITFLOW_ACTOR", "tester")
    ws = make_workspace(root)
    out = cli("init")
    assert out.exit_code == EXIT_OK, out.output
    yield {**ws, "root": root}
    mp.undo()


@pytest.fixture(scope="module")
def edited(store):
    """tiny: version 1 (the base, full) and version 2 (an edit of two facts, delta, production)."""
    from editflow.pipeline import EditJob, run_edit

    out = run_edit(
        EditJob(
            requests=str(store["facts"]),
            model=str(store["model"]),
            corpus=str(store["corpus"]),
            fluency=False,
            thresholds=LOOSE,
            registered_model="tiny",
            promote="always",
        )
    )
    assert (out.version, out.promoted) == (2, True)
    return store


def cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def as_json(*args: str) -> dict:
    out = cli(*args, "--json")
    assert out.exit_code == EXIT_OK, out.output
    return json.loads(out.stdout)


def test_exit_codes_are_distinct_constants():
    assert (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_GATE_FAILED) == (0, 1, 2, 3)
    assert "EXIT_GATE_FAILED" in _options.__doc__


def test_json_documents_of_the_default_model(store):
    v = as_json("versions", DEFAULT)
    assert [(r["version"], r["role"], r["parent"], r["aliases"], r["facts"]) for r in v["versions"]] == [
        (1, "base", None, ["production"], 0)
    ]
    assert as_json("facts", DEFAULT, "--subject", "x") == {"name": DEFAULT, "subject": "x", "facts": []}
    s = as_json("show", DEFAULT, "production")
    assert (s["version"], s["aliases"], s["facts"], s["metrics"]) == (1, ["production"], [], {})


def test_json_documents(edited):
    v = as_json("versions", "tiny")
    assert v["name"] == "tiny" and [r["version"] for r in v["versions"]] == [1, 2]
    base, edit = v["versions"]
    assert set(edit) == {"version", "aliases", "stage", "role", "parent", "facts", "new_facts", "created", "metrics"}
    assert (base["role"], base["parent"], edit["role"], edit["parent"]) == ("base", None, "edit", 1)
    assert "production" in edit["aliases"] and edit["facts"] == 2 and edit["new_facts"] == 2
    assert isinstance(edit["metrics"]["efficacy"], float) and edit["created"].endswith("Z")

    c = as_json("compare", "tiny", "1", "production")
    assert (c["name"], c["a"], c["b"]) == ("tiny", 1, 2) and c["only_a"] == []
    eff = c["metrics"]["efficacy"]
    assert set(eff) == {"a", "b", "delta"} and eff["delta"] == pytest.approx(eff["b"] - eff["a"])
    assert {f["subject"] for f in c["only_b"]} == {"gamma delta", "rho"} and set(c["only_b"][0]) == FACT_KEYS

    f = as_json("facts", "tiny", "--subject", "GAMMA")
    assert (f["name"], f["subject"]) == ("tiny", "GAMMA")
    assert f["facts"] == [
        {"version": 2, "subject": "gamma delta", "prompt": "alpha {}", "target_new": "Paris", "target_true": None}
    ]
    assert as_json("facts", "tiny", "--subject", "nothing like it")["facts"] == []

    s = as_json("show", "tiny", "2")
    assert {
        "name",
        "version",
        "description",
        "stage",
        "aliases",
        "tags",
        "run_id",
        "metrics",
        "facts",
        "events",
    } <= set(s) and s["facts"][0].keys() == FACT_KEYS

    assert as_json("promote", "tiny", "1", "--reason", "json test") == {
        "name": "tiny",
        "version": 1,
        "previous": 2,
        "action": "promote",
    }
    assert as_json("rollback", "tiny") == {"name": "tiny", "version": 2, "previous": 1, "action": "rollback"}


@pytest.mark.parametrize(
    "args",
    [
        ("versions", "nosuch"),
        ("versions", "nosuch", "--json"),
        ("facts", "nosuch", "--subject", "x"),
        ("show", DEFAULT, "99", "--json"),
        ("show", DEFAULT, "staging"),
        ("compare", DEFAULT, "1", "99"),
        ("promote", "nosuch", "1"),
        ("promote", DEFAULT, "99", "--json"),
        ("rollback", DEFAULT),
        ("rollback", DEFAULT, "--to", "99"),
        ("export", DEFAULT, "99", "exported"),
        ("eval", "models:/nosuch/1", "facts.json"),
        ("eval", f"models:/{DEFAULT}", "facts.json"),
        ("eval", f"models:/{DEFAULT}/1", "missing.json"),
        ("eval", "./no-such-model", "facts.json"),
    ],
)
def test_user_errors_are_one_error_line(store, args):
    out = cli(*args)
    assert out.exit_code == EXIT_ERROR and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    if args[0] in ("promote", "rollback"):
        assert lines[0].endswith("(production unchanged)")
    if args[1] == "nosuch":
        assert lines[0].startswith("error: no registered model named 'nosuch'")


def test_failed_promotion_leaves_production(store):
    from editflow.registry.versions import aliases_of

    reg = Registry()
    assert cli("promote", DEFAULT, "99").exit_code == EXIT_ERROR
    assert aliases_of(reg, DEFAULT) == {"production": 1}


@pytest.mark.parametrize(
    "args",
    [
        ("versions", DEFAULT),
        ("show", DEFAULT, "1", "--json"),
        ("init",),
        ("eval", f"models:/{DEFAULT}/1", "facts.json"),
    ],
)
def test_unreachable_server_is_named_fast_and_masked(store, args):
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    start = time.monotonic()
    out = cli(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert time.monotonic() - start < 30
    assert out.exit_code == EXIT_ERROR and out.stdout == "" and "s3cret" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: tracking server {mask_uri(uri)} is unreachable (ConnectionError)"
    ]


def _commands(command: click.Command, path: str = "editflow"):
    """``(path, command)`` of ``command`` and, for a group, every subcommand below it."""
    yield path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(None):  # type: ignore[arg-type]
            yield from _commands(command.get_command(None, name), f"{path} {name}")  # type: ignore[arg-type]


def test_every_option_of_every_command_has_help():
    found = {}
    for path, command in _commands(main):
        found[path] = [p.name for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert {path: names for path, names in found.items() if names} == {}
    assert {"editflow edit", "editflow stats compute", *(f"editflow {name}" for name in MY_COMMANDS)} <= set(found)


def test_every_option_has_help():
    from editflow.cli import _LazyGroup

    group = _LazyGroup()
    for name in MY_COMMANDS:
        command = group.get_command(None, name)  # type: ignore[arg-type]
        undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
        assert undocumented == [], name
        if name in JSON_COMMANDS:
            assert "--json prints {" in command.help, name
            assert cli(name, "--help").exit_code == EXIT_OK


def test_mask_uri():
    assert mask_uri("postgresql://user:secret@host/db") == "postgresql://user:****@host/db"
    assert mask_uri("error at mysql+pymysql://u:p%40ss@h:3306/x.") == "error at mysql+pymysql://u:****@h:3306/x."
    assert mask_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert mask_uri("http://host:5000/path") == "http://host:5000/path"


def test_ui_on_a_tracking_server_names_it_and_starts_nothing():
    out = cli("ui", env={"MLFLOW_TRACKING_URI": "https://bob:hunter2@mlflow.example.com"})
    assert out.exit_code == EXIT_OK and "hunter2" not in out.output
    assert out.output.strip() == (
        "the tracking server https://bob:****@mlflow.example.com serves the MLflow UI: open it in a browser"
    )


def test_ui_on_a_database_masks_credentials_in_what_it_prints_and_runs():
    from editflow.commands.ui import ui_command, ui_env

    uri = "postgresql://user:secret@db.example/mlflow"
    out = cli("ui", "--dry-run", "--port", "5055", env={"MLFLOW_TRACKING_URI": uri})
    assert out.exit_code == EXIT_OK and "secret" not in out.output
    # (the driver is named when psycopg 3 is installed: postgresql+psycopg://)
    assert re.search(r"--backend-store-uri postgresql(\+psycopg)?://user:\*\*\*\*@db\.example/mlflow", out.output)
    assert "--port 5055" in out.output
    assert "secret" not in " ".join(ui_command("127.0.0.1", 5055, ()))  # argv is visible to every user (ps)
    assert ui_env(uri, "file:///tmp/a")["MLFLOW_BACKEND_STORE_URI"] == uri


@pytest.mark.slow
def test_ui_serves_the_local_store(store):
    port, log = free_port(), store["root"] / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "editflow.cli", "ui", "--port", str(port), "--workers", "1"],
            cwd=store["root"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log)
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name={DEFAULT}"
        with urllib.request.urlopen(api, timeout=30) as r:
            assert json.loads(r.read())["registered_model"]["name"] == DEFAULT
    finally:
        stop_group(proc, grace_s=60)
    assert log.read_text().startswith(
        f"mlflow ui --host 127.0.0.1 --port {port} --workers 1 --backend-store-uri sqlite:"
    )


def installable(line: str, model_dir: Path) -> None:
    """``line`` is a bundled wheel that exists, or a requirement without a local version or an exact pin
    that the running (working) environment satisfies."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    if line.endswith(".whl"):
        assert not Path(line).is_absolute() and (model_dir / line).is_file(), line
        return
    req = Requirement(line)
    assert "+" not in line and "==" not in line and req.name != "editflow", line
    assert req.specifier.contains(Version(version(req.name)).public), line


def test_init_model_requirements_are_installable(store):
    check_requirements(f"models:/{DEFAULT}/1")


@pytest.mark.parametrize("uri", ["models:/tiny/1", "models:/tiny/2"])
def test_edit_model_requirements_are_installable(edited, uri):
    check_requirements(uri)


def check_requirements(uri: str) -> None:
    """The model's requirements name the bundled wheel and installable ranges; pip resolves them."""
    import mlflow.pyfunc
    import yaml

    req_file = Path(mlflow.pyfunc.get_model_dependencies(uri))
    model_dir = req_file.parent
    lines = req_file.read_text().split()
    assert lines[0].startswith("wheels/editflow-") and {l.split(">")[0] for l in lines[1:]} == {
        "torch",
        "transformers",
        "safetensors",
        "mlflow",
    }
    for line in lines:
        installable(line, model_dir)
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    assert next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict)) == lines
    assert "-r requirements.txt" in yaml.safe_load((model_dir / "python_env.yaml").read_text())["dependencies"]
    # pip resolves them offline from the bundled wheel and this environment: nothing is missing
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", "requirements.txt"],
        cwd=model_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Would install editflow-" in proc.stdout, proc.stdout + proc.stderr


def test_wheel_is_cached_per_source_digest(store):
    import zipfile

    from editflow.registry import flavor

    # a snapshot of the sources: other work on the tree must not change the digest between the calls
    files = {k: v if isinstance(v, bytes) else v.read_bytes() for k, v in flavor._source_files().items()}
    first = flavor.editflow_wheel(files)
    mtime = first.stat().st_mtime_ns
    start = time.monotonic()
    assert flavor.editflow_wheel(files) == first and first.stat().st_mtime_ns == mtime
    assert time.monotonic() - start < 5
    assert first.parent.parent == store["root"] / "cache" / "wheels"
    assert first.parent.name == flavor.source_digest(files)[:24]
    names = zipfile.ZipFile(first).namelist()
    assert "editflow/registry/flavor.py" in names and "editflow/assets/default_model/model.safetensors" in names
    assert flavor.source_digest({**files, "editflow/extra.py": b"x = 1\n"}) != flavor.source_digest(files)


def test_wheel_cache_keeps_the_newest_digests(tmp_path):
    from editflow.registry.flavor import _prune_wheels

    for i in range(10):
        (tmp_path / f"digest{i}").mkdir()
        os.utime(tmp_path / f"digest{i}", (1000 + i, 1000 + i))
    _prune_wheels(tmp_path, keep=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"digest{i}" for i in range(2, 10)]


def test_wheel_builds_from_an_installed_editflow_without_source_tree(tmp_path):
    """A non-editable install has no pyproject.toml: the wheel is rebuilt from the installed metadata."""
    import zipfile

    from editflow.registry import flavor

    files = {k: v for k, v in flavor._source_files().items() if k.startswith("editflow/")}
    files["pyproject.toml"] = flavor._installed_pyproject().encode()
    wheel = zipfile.ZipFile(flavor._build_wheel(flavor._stage(files, tmp_path / "src"), tmp_path / "out"))
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: mlflow" in meta and "Requires-Dist: torch" in meta
    entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "editflow = editflow.cli:main" in entry_points
    assert "editflow/registry/flavor.py" in wheel.namelist()
