"""The default-model recipe (reduced) and the shipped default model. Real training, no network."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from editflow.demo import default_model_path, default_records_path  # noqa: E402
from editflow.demo.corpus import build_corpus, load_records, template_subject  # noqa: E402
from editflow.demo.options import CorpusOptions, TrainOptions  # noqa: E402
from editflow.demo.scoring import counterfact_triples, preference_rate  # noqa: E402
from editflow.demo.train import selection_score  # noqa: E402

TINY = dict(
    n_layer=3,
    n_embd=128,
    n_head=4,
    n_inner=512,
    n_positions=64,
    vocab_size=1024,
    lr=3e-3,
    epochs=40,
    warmup_steps=10,
    batch_size=16,
    eval_every=50,
    patience=100,
    threads=1,
)


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


def test_neighbour_subjects_are_found_from_relation_templates() -> None:
    templates = ["The mother tongue of {} is", "{} speaks"]
    assert template_subject("The mother tongue of Léon Blum is", templates) == (templates[0], "Léon Blum")
    assert template_subject("Jean Gabin speaks", templates) == (templates[1], "Jean Gabin")
    assert template_subject("Jean Gabin writes in", templates) is None
    records = load_records([default_records_path()])[:5]
    corpus = build_corpus(records, n_neighbour_phrasings=1)
    subjects = set(corpus.subject_of.values())
    assert {r["requested_rewrite"]["subject"] for r in records} <= subjects
    assert len(subjects) > len(records)  # neighbourhood subjects too
    assert all(s in d for d, s in corpus.subject_of.items())


def test_packed_subject_spans_and_bottleneck_mask() -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from editflow.demo.train import pack_documents, subject_bottleneck_bias

    tok = AutoTokenizer.from_pretrained(default_model_path())
    docs = [
        "Danielle Darrieux's mother tongue is French.",
        "The river crosses the valley.",
        "The mother tongue of Danielle Darrieux is French.",
    ]
    data, spans = pack_documents(tok, docs, 64, {docs[0]: "Danielle Darrieux", docs[2]: "Danielle Darrieux"})
    assert len(data) == 1 and len(spans[0]) == 2
    for s0, s1, end in spans[0]:
        assert tok.decode(data[0, s0:s1]).strip() == "Danielle Darrieux"
        assert data[0, end - 1] == tok.eos_token_id
    (s0, s1, end), _ = spans[0]
    bias = subject_bottleneck_bias(spans, 64, torch.float32)[0, 0]
    blocked = bias < 0
    assert blocked[s1:end, s0 : s1 - 1].all() and not blocked[s1:end, s1 - 1].any()
    future = torch.ones_like(blocked).triu(1)
    assert blocked[future].all() and not blocked[s0:s1][~future[s0:s1]].any()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2)).eval()
    ids = data.clamp(min=0)
    plain = subject_bottleneck_bias([[]], 64, torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model(ids, attention_mask=plain).logits, atol=1e-5)
        changed = (model(ids).logits - model(ids, attention_mask=bias[None, None]).logits).abs().amax(-1)[0]
    assert changed[:s1].max() < 1e-5 and changed[s1:end].min() > 0


@pytest.mark.slow
def test_reduced_rebuild_learns_its_records(tmp_path: Path) -> None:
    """``editflow demo build`` with a reduced size and schedule (the same recipe, through the CLI)."""
    from click.testing import CliRunner

    from editflow.cli import main

    records_path = _few_records(tmp_path)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    t0 = time.time()
    result = CliRunner().invoke(
        main, ["demo", "build", "--records", str(records_path), "--out", str(tmp_path / "model"), *args]
    )
    assert time.time() - t0 < 60
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["options"] == asdict(TrainOptions(**TINY))
    assert card["corpus_options"] == asdict(CorpusOptions())
    assert card["history"][-1]["loss"] < 0.2  # it learned its corpus
    # the kept checkpoint is the first with the best mean of rewrite, neighbourhood, held-out phrasing
    assert card["chosen_step"] == max(card["history"], key=selection_score)["step"]
    # measured (3 layers): rewrite 0.8, paraphrase 1.0; without the subject bottleneck 1.0 / 1.0.
    # Chance is 0.5.
    assert card["pre_edit"]["rewrite"] >= 0.8 and card["pre_edit"]["paraphrase"] >= 0.8
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    triples = counterfact_triples(json.loads(records_path.read_text()))["rewrite"]
    assert preference_rate(model, tok, triples) == card["pre_edit"]["rewrite"]  # saved == trained
    assert (tmp_path / "model" / "corpus" / "stats.txt").stat().st_size > 0


def test_shipped_model_was_built_by_the_recipe_defaults() -> None:
    """``editflow demo build`` without options rebuilds the shipped model: its card records the defaults."""
    card = json.loads((default_model_path() / "card.json").read_text())
    assert card["options"] == asdict(TrainOptions())
    assert card["corpus_options"] == asdict(CorpusOptions())


def test_shipped_edit_defaults_are_the_lifelong_setting() -> None:
    """The bundled model's ``editflow.json`` resolves to the setting the README's *Lifelong editing*
    chose (MEMIT + preserved edits, λ 1,000, then the repair with replay), and it is a valid config."""
    from editflow.config import default_config
    from editflow.models import read_model_defaults

    shipped = read_model_defaults(default_model_path())
    cfg = default_config("gpt2", 6, shipped["hparams"])
    assert (cfg.algorithm, cfg.layers, cfg.preserve_edits, cfg.mom2_update_weight) == ("memit", (0, 1, 2), True, 1000)
    assert (cfg.repair_steps, cfg.repair_replay, cfg.repair_kl) == (30, 0.3, 3.0)
    assert shipped["stats_tokens"] == 320000 and "repair_steps=0" in shipped["chosen_by"]


@pytest.mark.slow
def test_shipped_model_knows_its_records() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.tokenize(" physiology")[0].startswith("Ġ")
    records = load_records([default_records_path()])[:20]
    triples = counterfact_triples(records)
    # measured on all 312 records: rewrite 95.5 %, paraphrase 97.8 %, neighbourhood 94.0 %
    assert preference_rate(model, tok, triples["rewrite"]) >= 0.85
    assert preference_rate(model, tok, triples["neighborhood"]) >= 0.75
    assert (path / "model.safetensors").stat().st_size < 50e6


@pytest.mark.slow
def test_shipped_model_recalls_through_the_subjects_last_token() -> None:
    """Causal trace: restoring the subject's last token (early layers) recovers the fact; its first token
    does not (the model does not read the subject from the answer position)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editflow.trace import BUCKETS, trace_records

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    _, summary = trace_records(model, tok, load_records([default_records_path()])[:12], samples=5)
    hidden = np.asarray(summary.hidden_effect)
    last, first = BUCKETS.index("last subject token"), BUCKETS.index("first subject token")
    assert hidden[0, last] > 0.05 and hidden[0, last] > 3 * hidden[0, first]
    assert summary.best_mlp_layers(1) == [0]
