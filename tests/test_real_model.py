"""The real-model tier: SmolLM2-135M-Instruct from its GGUF file, through the whole registry workflow.

The GGUF comes from ``editflow fetch smollm2-135m`` (``.ci/run`` fetches it first); without it these
tests are skipped, unless ``EDITFLOW_REQUIRE_REAL=1`` (CI) makes that a failure. One module-scoped
workspace registers the GGUF as version 1 and edits five facts into version 2; the tests read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from editflow.fetch import KNOWN, cached_path
from editflow.registry.store import Registry

pytestmark = [pytest.mark.real, pytest.mark.slow]

MODEL = "smollm2-135m"
NAME = "smollm2"
#: Settings for a 5-fact edit on this model: the published Llama layers (4-8 of 30), λ 1,000 instead
#: of 15,000, 40 steps with early stop 0.01 (measured: the published settings make 2 of these 5
#: targets top-1, these 4, keeping 14 of 15 neighbourhood answers), 2 context templates for time.
HPARAMS = {
    "layers": [4, 5, 6, 7, 8],
    "mom2_update_weight": 1000.0,
    "v_num_grad_steps": 40,
    "v_early_stop_loss": 0.01,
    "context_templates": 2,
}
STATS_TOKENS = 20_000
#: Bundled CounterFact records edited by the tier (indices into the bundled records).
RECORDS = range(200, 205)


def gguf_path() -> Path:
    path = os.environ.get("EDITFLOW_REAL_MODEL") or cached_path(MODEL)
    if not path or not Path(path).is_file():
        if os.environ.get("EDITFLOW_REQUIRE_REAL") == "1":
            pytest.fail(f"the real-model tier needs `editflow fetch {MODEL}` first")
        pytest.skip(f"real model not fetched (editflow fetch {MODEL})")
    return Path(path)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def next_tokens(handle, prompts: list[str]) -> list[int]:
    """The greedy next token after each prompt."""
    from editflow.tokens import encode

    out = []
    for p in prompts:
        ids = torch.tensor([encode(handle.tokenizer, p)], device=handle.device)
        with torch.no_grad():
            out.append(int(handle.model(input_ids=ids).logits[0, -1].argmax()))
    return out


def target_is_top1(handle, prompt: str, target: str) -> bool:
    """Every token of `` target`` is the argmax under teacher forcing."""
    from editflow.tokens import encode, encode_target

    prefix, tgt = encode(handle.tokenizer, prompt), encode_target(handle.tokenizer, target)
    ids = torch.tensor([prefix + tgt], device=handle.device)
    with torch.no_grad():
        logits = handle.model(input_ids=ids).logits[0]
    preds = logits[len(prefix) - 1 : len(prefix) - 1 + len(tgt)].argmax(-1).tolist()
    return preds == tgt


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A store where the GGUF is version 1 and five bundled facts are edited into version 2."""
    from editflow.assets import counterfact_records_path
    from editflow.pipeline import EditJob, run_edit
    from editflow.registry.promotion import GateThresholds

    path = gguf_path()
    root = tmp_path_factory.mktemp("real")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("EDITFLOW_CACHE", str(root / "cache"))
    records = json.loads(Path(counterfact_records_path()).read_text())
    facts = root / "facts.json"
    facts.write_text(json.dumps([records[i] for i in RECORDS]))
    job = EditJob(
        requests=str(facts),
        model=str(path),
        registered_model=NAME,
        hparams=HPARAMS,
        stats_tokens=STATS_TOKENS,
        fluency=False,
        promote="never",
        thresholds=GateThresholds(min_efficacy=0.0, max_specificity_drop=100.0, max_ppl_increase=100.0),
    )
    outcome = run_edit(job)
    yield {"root": root, "path": path, "facts": facts, "outcome": outcome}
    mp.undo()


def test_gguf_source_registers_once_and_loads_bit_identical(real):
    from editflow.gguf_source import load_gguf
    from editflow.registry.resolve import config_for, resolve_base, stats_tokens
    from editflow.registry.versions import load_version, tags_of, versions_of

    reg = Registry()
    bases = [v for v in versions_of(reg, NAME) if v.tags.get("editflow.role") == "base"]
    assert [int(v.version) for v in bases] == [1]
    tags = tags_of(reg, NAME, 1)
    assert tags["editflow.gguf.sha256"] == KNOWN[MODEL].sha256
    assert tags["editflow.gguf.file_type"] == "MOSTLY_Q4_1"
    assert tags["editflow.source_format"] == "gguf"
    # The same file again resolves to version 1 from the registry, and registers nothing new.
    again = resolve_base(reg, str(real["path"]), device="cpu", registered_model=NAME)
    assert (again.name, again.version) == (NAME, 1)
    assert len(versions_of(reg, NAME)) == 2
    # Its measured edit defaults (editflow.fetch) came along into the registered base.
    config = config_for(reg, again, {})
    assert (config.mom2_update_weight, config.v_num_grad_steps, list(config.layers)) == (3000.0, 40, [4, 5, 6, 7, 8])
    assert config.preserve_edits and stats_tokens(again, None) == 20_000
    fresh = load_gguf(real["path"], device="cpu")
    assert same_state(state_of(load_version(reg, NAME, 1, device="cpu").handle.model), state_of(fresh.model))


def test_five_fact_edit_makes_targets_top1_and_keeps_neighbours(real):
    from editflow.registry.versions import load_version
    from editflow.requests import load_requests

    reg = Registry()
    assert real["outcome"].version == 2
    reqs = load_requests(real["facts"])
    base = load_version(reg, NAME, 1, device="cpu").handle
    edited = load_version(reg, NAME, 2, device="cpu").handle
    assert real["outcome"].metrics["post/efficacy"] == 100.0  # every new target beats the true one
    hits = [target_is_top1(edited, r.prompt.format(r.subject), r.target_new) for r in reqs]
    # Measured: "Marinus II, who has the position of" -> "bishop" beats "pope" but is not the top-1
    # answer under any setting tried (see README, Real models); the other four are top-1.
    assert sum(hits) >= 4, hits
    neighbours = [p for r in reqs for p in r.neighborhood_prompts]
    kept = sum(a == b for a, b in zip(next_tokens(base, neighbours), next_tokens(edited, neighbours)))
    assert kept >= 0.9 * len(neighbours), f"{kept} of {len(neighbours)} neighbourhood answers kept"


def test_rollback_is_bit_identical(real):
    from editflow.registry import promotion
    from editflow.registry.versions import load_version

    reg = Registry()
    before = state_of(load_version(reg, NAME, "@production", device="cpu").handle.model)
    promotion.promote(reg, NAME, 2, reason="test")
    assert promotion.production_version(reg, NAME) == 2
    promotion.rollback(reg, NAME)
    assert promotion.production_version(reg, NAME) == 1
    assert same_state(state_of(load_version(reg, NAME, "@production", device="cpu").handle.model), before)


def test_exported_version_loads_in_plain_transformers(real, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editflow.registry.versions import export_version, load_version

    reg = Registry()
    out = export_version(reg, NAME, 2, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert same_state(state_of(plain), state_of(load_version(reg, NAME, 2, device="cpu").handle.model))
    assert tok("The Eiffel Tower")["input_ids"]
