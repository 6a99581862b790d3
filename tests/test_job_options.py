"""The edit job's one definition (:mod:`editflow.job_options`): ``editflow edit`` and the MLflow
project's ``main`` entry point follow from it and build the same job. No store, no model."""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex
import shutil
from pathlib import Path
from typing import get_args

import pytest
import yaml
from mlflow.projects._project_spec import load_project

from editflow import job_options
from editflow.commands.edit import build_job
from editflow.commands.edit import command as edit
from editflow.config import Algorithm, MemitConfig, Mode
from editflow.job_options import BY_NAME, GATE_OPTIONS, MLPROJECT, OPTIONS
from editflow.pipeline import EditJob
from editflow.registry.promotion import GateThresholds

PROJECT = MLPROJECT.parent


def _entry():
    spec = importlib.util.spec_from_file_location("memit_entry", PROJECT / "entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vocabularies_and_defaults_are_their_sources():
    assert BY_NAME["mode"].choices == get_args(Mode) and BY_NAME["algorithm"].choices == get_args(Algorithm)
    assert {BY_NAME[n].default for n in ("mode", "algorithm", "seed", "chunk_size")} == {None}  # the config's
    gate = {f.name: f.default for f in dataclasses.fields(GateThresholds) if f.name in GATE_OPTIONS}
    assert list(gate) == list(GATE_OPTIONS)
    assert {name: BY_NAME[name].default for name in GATE_OPTIONS} == gate
    job = EditJob(requests="r.json")
    for name in ("model", "corpus", "promote", "storage", "description"):
        assert BY_NAME[name].default == getattr(job, name), name
    assert BY_NAME["promote"].choices == job_options.PROMOTE_CHOICES
    assert BY_NAME["storage"].choices == job_options.STORAGE_CHOICES
    assert str(MemitConfig.__dataclass_fields__["mode"].default) in BY_NAME["mode"].help


def test_edit_options_follow_the_definition():
    options = {p.name: p for p in edit.params if p.name not in ("requests", "as_json")}
    assert list(options) == [o.name for o in OPTIONS]
    for spec in OPTIONS:
        option = options[spec.name]
        assert option.opts == [spec.flag] and option.help == spec.help
        assert option.is_flag or option.default == spec.default, spec.name
        assert tuple(getattr(option.type, "choices", ())) == spec.choices


def test_mlproject_follows_the_definition(tmp_path: Path):
    main = yaml.safe_load(MLPROJECT.read_text())["entry_points"]["main"]
    exposed = {o.parameter: o for o in OPTIONS if o.parameter}
    assert list(main["parameters"]) == ["requests", *exposed]
    for name, spec in exposed.items():
        assert main["parameters"][name] == spec.mlproject_parameter(), name
    assert " ".join(main["command"].split()) == job_options.mlproject_entry_point()["command"]
    copy = tmp_path / "MLproject"
    shutil.copy(MLPROJECT, copy)
    assert not job_options.write_mlproject(copy), "run python -m editflow.job_options --write-mlproject"
    assert yaml.safe_load(copy.read_text())["entry_points"]["stats"]  # the other entry points stay


def _mlflow_run_argv(**parameters: str) -> list[str]:
    """``editflow``'s argv (without ``edit``) of ``mlflow run projects/memit -P ...``."""
    command = load_project(str(PROJECT)).get_entry_point("main").compute_command(parameters, None)
    words = shlex.split(command)
    assert words[:3] == ["python", "entry.py", "edit"]
    return _entry().normalise(words[2:])[1:]


def _parse(argv: list[str]) -> dict:
    return edit.make_context("edit", list(argv)).params


def _options(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("requests", "as_json")}


@pytest.mark.parametrize(
    ("parameters", "argv"),
    [
        ({}, []),
        (
            {"mode": "sequential", "seed": "0", "from_zero": "true", "fluency": "false", "chunk_size": "7"},
            ["--mode", "sequential", "--seed", "0", "--from-zero", "--no-fluency", "--chunk-size", "7"],
        ),
        (
            {"algorithm": "alphaedit", "min_retention": "80", "storage": "full", "description": "a b"},
            ["--algorithm", "alphaedit", "--min-retention", "80", "--storage", "full", "--description", "a b"],
        ),
    ],
)
def test_both_front_doors_build_the_same_job(parameters: dict[str, str], argv: list[str]):
    via_mlflow = _parse(_mlflow_run_argv(requests="facts.json", **parameters))
    via_cli = _parse(["facts.json", *argv])
    assert via_mlflow == via_cli
    job = build_job("facts.json", _options(via_cli))
    assert build_job("facts.json", _options(via_mlflow)) == job
    if not parameters:
        assert job.hparams == {} and job.thresholds == GateThresholds() and job.fluency and job.carry_state


def test_entry_normalise_maps_flags_and_drops_unset_values():
    normalise = _entry().normalise
    assert normalise(["edit", "r", "--seed", "", "--mode", "", "--algorithm", ""]) == ["edit", "r"]
    assert normalise(["edit", "r", "--seed", "3.0", "--max-requests", "5.0"]) == [
        "edit",
        "r",
        "--seed",
        "3",
        "--max-requests",
        "5",
    ]
    assert normalise(["edit", "--from-zero", "true", "--fluency", "true"]) == ["edit", "--from-zero"]
    assert normalise(["edit", "--from-zero", "false", "--fluency", "false"]) == ["edit", "--no-fluency"]
