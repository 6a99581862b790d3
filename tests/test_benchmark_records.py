"""The lifelong benchmarks' record hygiene: the repair's anchor never sees an evaluated prompt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from editflow import assets

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module (its sibling imports resolved from ``benchmarks/``)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_without_evaluated_anchors_drops_only_the_evaluated_attribute_prompts():
    records = json.loads(assets.counterfact_records_path().read_text())
    clean = load_benchmark_module("_records").without_evaluated_anchors(records)
    evaluated = {p for r in records for p in r["neighborhood_prompts"]}
    kept = [p for r in clean for p in r["attribute_prompts"]]
    dropped = sum(len(r["attribute_prompts"]) for r in records) - len(kept)
    assert dropped > 0 and not evaluated & set(kept)  # the bundled records do overlap
    assert all(set(c["attribute_prompts"]) <= set(r["attribute_prompts"]) for c, r in zip(clean, records))
    assert [{**c, "attribute_prompts": None} for c in clean] == [{**r, "attribute_prompts": None} for r in records]


def test_lifelong_reads_several_files_and_leaves_out_the_records_editflow_refuses(tmp_path, capsys):
    counterfact = json.loads(assets.counterfact_records_path().read_text())[:3]
    zsre = {
        "subject": "Tom",
        "src": "Where was Tom born?",
        "alt": "Paris",
        "answers": ["Rome"],
        "rephrase": "Tom's birthplace?",
    }
    no_change = {**zsre, "alt": "Rome"}  # the new answer is the true one: not an edit
    (tmp_path / "cf.json").write_text(json.dumps(counterfact))
    (tmp_path / "zsre.json").write_text(json.dumps([zsre, no_change]))
    records = load_benchmark_module("lifelong").load_records(f"{tmp_path / 'cf.json'},{tmp_path / 'zsre.json'}")
    assert records == [*counterfact, zsre]
    assert "1 of 5 records are not valid edits" in capsys.readouterr().err


def test_lifelong_figures_take_the_counterfact_metric_else_the_zsre_one():
    figure = load_benchmark_module("lifelong").figure
    assert figure({"post/efficacy": 90.0, "post/zsre_efficacy": 10.0}, "es", "post/") == 90.0
    assert figure({"post/zsre_specificity": 70.0}, "ns", "post/") == 70.0
    assert figure({"pre/zsre_paraphrase": 5.0}, "ps", "post/") is None
