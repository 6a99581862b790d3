"""The lifelong benchmarks' record hygiene: the repair's anchor never sees an evaluated prompt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from editflow import assets

ROOT = Path(__file__).resolve().parents[1]


def load_records_module():
    spec = importlib.util.spec_from_file_location("_records", ROOT / "benchmarks" / "_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_evaluated_anchors_drops_only_the_evaluated_attribute_prompts():
    records = json.loads(assets.counterfact_records_path().read_text())
    clean = load_records_module().without_evaluated_anchors(records)
    evaluated = {p for r in records for p in r["neighborhood_prompts"]}
    kept = [p for r in clean for p in r["attribute_prompts"]]
    dropped = sum(len(r["attribute_prompts"]) for r in records) - len(kept)
    assert dropped > 0 and not evaluated & set(kept)  # the bundled records do overlap
    assert all(set(c["attribute_prompts"]) <= set(r["attribute_prompts"]) for c, r in zip(clean, records))
    assert [{**c, "attribute_prompts": None} for c in clean] == [{**r, "attribute_prompts": None} for r in records]
