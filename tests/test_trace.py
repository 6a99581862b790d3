"""Causal tracing on a tiny random model (shapes, finiteness) and on the shipped default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from editflow.demo import default_model_path, default_records_path  # noqa: E402
from editflow.demo.corpus import build_corpus, load_records  # noqa: E402
from editflow.demo.tokenizer import train_tokenizer  # noqa: E402
from editflow.trace import BUCKETS, save_summary, subject_span, trace_records  # noqa: E402


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records([default_records_path()])[:3]


@pytest.fixture(scope="module")
def tiny(records: list[dict]) -> tuple[GPT2LMHeadModel, object]:
    torch.manual_seed(0)
    tok = train_tokenizer(build_corpus(records).train, vocab_size=600)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=3, n_head=2,
                                       n_inner=64, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    return model.eval(), tok


def test_subject_span_matches_prefix_tokenisation(tiny) -> None:
    _, tok = tiny
    a, b = subject_span(tok, "The mother tongue of {} is", "Danielle Darrieux")
    full = tok("The mother tongue of Danielle Darrieux is", add_special_tokens=False)["input_ids"]
    assert 0 < a < b < len(full)
    assert tok.decode(full[a:b]).strip() == "Danielle Darrieux"


def test_trace_tiny_model_shapes_and_finite(tiny, records, tmp_path: Path) -> None:
    model, tok = tiny
    results, summary = trace_records(model, tok, records, noise=3.0, samples=4, window=3)
    for r in results:
        n_tok = len(r.tokens)
        assert r.hidden.shape == (3, n_tok) and r.mlp.shape == (3,)
        assert np.isfinite(r.hidden).all() and np.isfinite(r.mlp).all()
        assert 0 <= r.p_corrupt <= 1 and 0 <= r.p_clean <= 1
    assert np.asarray(summary.hidden_effect).shape == (3, len(BUCKETS))
    assert np.isfinite(summary.mlp_effect).all()
    out = save_summary(summary, tmp_path)
    assert (out / "trace.png").stat().st_size > 0
    assert json.loads((out / "trace.json").read_text())["n"] == 3


def test_restoring_everything_recovers_clean_probability(tiny, records) -> None:
    """Restoring the last layer's block output at the last token gives back the clean prediction."""
    model, tok = tiny
    results, _ = trace_records(model, tok, records[:1], samples=3)
    r = results[0]
    assert r.hidden[-1, -1] == pytest.approx(r.p_clean, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_trace_cli_on_shipped_model(tmp_path: Path) -> None:
    """Measured on the shipped model (50 records): corruption lowers P(true) (0.63 -> 0.17); restoring
    the last token recovers it, increasingly with depth; restoring the last subject token alone
    recovers little (< 0.01) and less than the first subject token, i.e. the ROME-style localisation at
    the last subject token does NOT hold for this small model."""
    from editflow.commands.trace import command
    res = CliRunner().invoke(command, [str(default_model_path()), "--records", str(default_records_path()),
                                       "--n", "10", "--samples", "5", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "trace.json").read_text())
    hid = np.asarray(data["hidden_effect"])
    last_subj, last_tok = BUCKETS.index("last subject token"), BUCKETS.index("last token")
    assert data["p_clean"] > data["p_corrupt"]
    assert hid[-1, last_tok] == pytest.approx(data["p_clean"] - data["p_corrupt"], abs=1e-4)
    assert hid[-1, last_tok] > hid[0, last_tok]
    assert hid[:, last_subj].max() < hid[-1, last_tok]
