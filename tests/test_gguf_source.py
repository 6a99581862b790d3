"""GGUF files as model sources: inspection, clear errors, and registration once through the workflow.

Uses a tiny random Llama written as a GGUF by editflow's own exporter (``test_gguf_export.make_tiny_gguf``);
the real SmolLM2 file is exercised by the real-model tier.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_gguf_export import make_tiny_gguf

from editflow.gguf_source import GgufError, inspect_gguf, load_gguf
from editflow.registry.resolve import registered_name_for
from editflow.registry.store import Registry


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"))


def test_inspect_reads_identity(tiny_gguf):
    import hashlib

    info = inspect_gguf(tiny_gguf)
    assert info.architecture == "llama" and info.file_type == "ALL_F32"
    assert info.sha256 == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert info.n_tensors == sum(info.tensor_types.values()) and info.tensor_types.get("F32")
    tags = info.tags()
    assert tags["gguf.sha256"] == info.sha256 and tags["source_format"] == "gguf"
    assert registered_name_for(str(tiny_gguf)) == "editflow-tiny-llama"


def test_truncated_and_corrupt_files_are_refused(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 4096])
    with pytest.raises(GgufError, match="truncated"):
        inspect_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(GgufError, match="not a valid GGUF file"):
        inspect_gguf(garbage)
    with pytest.raises(GgufError, match="no such GGUF file"):
        inspect_gguf(tmp_path / "absent.gguf")
    with pytest.raises(GgufError, match="not a regular file"):
        inspect_gguf(tmp_path)


def test_unsupported_architecture_names_the_supported_list(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufError, match=r"'bert' cannot be loaded by transformers; supported: .*llama"):
        inspect_gguf(path)


def test_missing_extra_names_it(tiny_gguf):
    """Without the gguf package the error names the extra (a real interpreter with gguf hidden)."""
    code = (
        "import sys\nsys.modules['gguf'] = None  # as if it were not installed\n"
        "from editflow.gguf_source import inspect_gguf, GgufError\n"
        f"try:\n    inspect_gguf({str(tiny_gguf)!r})\nexcept GgufError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'editflow[gguf]'" in out.stdout, out.stderr


def test_load_dequantises_to_the_asked_dtype(tiny_gguf):
    handle = load_gguf(tiny_gguf, device="cpu", dtype="bfloat16")
    assert next(handle.model.parameters()).dtype == torch.bfloat16
    assert handle.extra["gguf"]["sha256"] == inspect_gguf(tiny_gguf).sha256
    assert handle.adapter.model_type == "llama"


def test_edit_from_a_gguf_registers_its_base_once(tiny_gguf, tmp_path, monkeypatch):
    from test_workflow import LOOSE

    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.resolve import resolve_base
    from editflow.registry.versions import load_version, tags_of, versions_of

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The river {i} flows past the old mill and the stone bridge." for i in range(60)))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "The {} flows past the", "subject": "river", "target_new": "bridge"}]))
    hparams = {
        "layers": [0, 1],
        "mom2_update_weight": 1.0,
        "v_num_grad_steps": 10,
        "context_templates": 0,
        "kl_factor": 0.0,
    }
    common = dict(
        requests=str(facts),
        model=str(tiny_gguf),
        corpus=str(corpus),
        fluency=False,
        thresholds=LOOSE,
        hparams=hparams,
        stats_tokens=500,
        promote="never",
    )
    first = run_edit(EditJob(**common))
    reg = Registry()
    name = registered_name_for(str(tiny_gguf))
    assert (first.name, first.version, first.parent_version) == (name, 2, 1)
    tags = tags_of(reg, name, 1)
    info = inspect_gguf(tiny_gguf)
    assert tags["editflow.gguf.sha256"] == info.sha256 and tags["editflow.gguf.file_type"] == "ALL_F32"
    assert info.sha256 in json.dumps(load_version(reg, name, 1, device="cpu").handle.extra["editflow"])
    second = run_edit(EditJob(**common))  # the same file: found by its digest, no second base
    assert second.parent_version == 1
    assert [v.tags.get("editflow.role") for v in versions_of(reg, name)] == ["base", "edit", "edit"]
    again = resolve_base(reg, str(tiny_gguf), device="cpu")
    assert (again.name, again.version) == (name, 1)
    fresh = load_gguf(tiny_gguf, device="cpu").model.state_dict()
    stored = load_version(reg, name, 1, device="cpu").handle.model.state_dict()
    assert fresh.keys() == stored.keys() and all(torch.equal(fresh[k], stored[k]) for k in fresh)


def test_a_packaged_gguf_brings_its_measured_edit_defaults(tiny_gguf, tmp_path, monkeypatch):
    """A file whose digest is a packaged model's (editflow fetch) is edited with that model's measured
    settings, also once it is registered; any other file gets the family defaults, and explicit
    settings still win."""
    from dataclasses import replace

    from editflow import fetch
    from editflow.registry.resolve import config_for, ensure_registered_base, resolve_base

    assert fetch.packaged_defaults(fetch.KNOWN["smollm2-135m"].sha256)["hparams"]["mom2_update_weight"] == 3000.0
    sha = inspect_gguf(tiny_gguf).sha256
    assert fetch.packaged_defaults(sha) == {}
    measured = {"hparams": {"layers": [1], "mom2_update_weight": 7.0}, "chosen_by": "a test"}
    monkeypatch.setitem(fetch.KNOWN, "tiny", replace(fetch.KNOWN["smollm2-135m"], sha256=sha, edit_defaults=measured))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    reg = Registry()
    name = registered_name_for(str(tiny_gguf))
    base = ensure_registered_base(reg, resolve_base(reg, str(tiny_gguf), device="cpu"), name)
    assert base.version == 1  # registered, with the defaults in its editflow.json
    again = resolve_base(reg, str(tiny_gguf), device="cpu")  # read back from the registry
    assert (again.name, again.version) == (name, 1)
    for ref in (base, again):
        config = config_for(reg, ref, {})
        assert (list(config.layers), config.mom2_update_weight) == ([1], 7.0)
    assert config_for(reg, again, {"mom2_update_weight": 2.0}).mom2_update_weight == 2.0


def test_a_truncated_gguf_registers_nothing(tiny_gguf, tmp_path, monkeypatch):
    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.versions import registered_names

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:-1000])
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "The {} flows", "subject": "river", "target_new": "bridge"}]))
    with pytest.raises(GgufError, match="truncated"):
        run_edit(EditJob(requests=str(facts), model=str(bad), fluency=False))
    assert registered_names(Registry()) == []
