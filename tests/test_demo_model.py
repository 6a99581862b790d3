"""The default-model recipe (reduced) and the shipped default model. Real training, no network."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from editflow.demo import build_default_model, default_model_path, default_records_path  # noqa: E402
from editflow.demo.corpus import build_corpus, load_records  # noqa: E402
from editflow.demo.scoring import counterfact_triples, preference_rate  # noqa: E402

TINY = dict(n_layer=2, n_embd=128, n_head=4, n_inner=512, n_positions=64, vocab_size=1024,
            lr=3e-3, epochs=40, warmup_steps=10, batch_size=16, eval_every=50, patience=100, threads=1)


def _few_records(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(load_records([default_records_path()])[:n]))
    return path


def test_corpus_is_deterministic_and_contains_the_facts() -> None:
    records = load_records([default_records_path()])[:5]
    a, b = build_corpus(records, seed=3), build_corpus(records, seed=3)
    assert a == b
    rw = records[0]["requested_rewrite"]
    assert f"{rw['prompt'].format(rw['subject'])} {rw['target_true']['str']}." in a.train
    assert not set(a.heldout) & set(a.train)


@pytest.mark.slow
def test_reduced_rebuild_learns_its_records(tmp_path: Path) -> None:
    records_path = _few_records(tmp_path)
    t0 = time.time()
    card = build_default_model(records_path, tmp_path / "model", **TINY)
    assert time.time() - t0 < 60
    assert card["pre_edit"]["rewrite"] == 1.0
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    triples = counterfact_triples(json.loads(records_path.read_text()))["rewrite"]
    assert preference_rate(model, tok, triples) == 1.0
    assert (tmp_path / "model" / "corpus" / "stats.txt").stat().st_size > 0


@pytest.mark.slow
def test_shipped_model_knows_its_records() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.tokenize(" physiology")[0].startswith("Ġ")
    records = load_records([default_records_path()])[:20]
    triples = counterfact_triples(records)
    # measured on all 312 records: rewrite 95.5 %, paraphrase 97.1 %, neighbourhood 86.2 %
    assert preference_rate(model, tok, triples["rewrite"]) >= 0.85
    assert preference_rate(model, tok, triples["neighborhood"]) >= 0.75
    assert (path / "model.safetensors").stat().st_size < 50e6
