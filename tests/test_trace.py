"""Causal tracing: exact invariants on tiny random models of every family, request formats, the window
choice, the CLI (paths and models:/ URIs) and the measured trace of the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES, tiny_model, word_tokenizer

from editflow.commands.trace import command, save_summary
from editflow.models import detect_adapter
from editflow.registry.store import Registry
from editflow.requests import parse_requests
from editflow.trace import (
    BUCKETS,
    TraceSummary,
    best_window,
    subject_span,
    summarise,
    trace_records,
    trace_requests,
    window_users,
)

RECORDS = [
    {"prompt": "The {} plays", "subject": "alpha beta", "target_new": "chess", "target_true": "tennis"},
    {
        "requested_rewrite": {
            "prompt": "{} lives in",
            "subject": "gamma delta epsilon",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        }
    },
    {"subject": "kappa", "src": "the kappa is", "alt": "red", "answers": ["blue"]},
    {"prompt": "I {} is", "subject": "sigma", "target_new": "green"},  # no target_true: traces top-1
]
TOL = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def requests():
    return parse_requests(RECORDS)


@pytest.fixture(scope="module", params=FAMILIES)
def traced(request, requests):
    """(model, tokenizer, results) of every family, 4 layers, 3 noise samples, MLP window 3."""
    model, tok = tiny_model(request.param)
    results, summary = trace_requests(model, tok, requests, samples=3, window=3)
    return model, tok, results, summary


def test_subject_span_matches_prefix_tokenisation() -> None:
    tok = word_tokenizer()
    a, b = subject_span(tok, "The {} plays tennis", "alpha beta gamma")
    ids = tok("The alpha beta gamma plays tennis")["input_ids"]
    assert (a, b) == (1, 4) and tok.decode(ids[a:b]).strip() == "alpha beta gamma"
    assert subject_span(tok, "{} lives in", "rho") == (0, 1)


def test_trace_shapes_and_exact_invariants(traced, requests) -> None:
    """Positions before the subject are untouched by the noise, so restoring them changes nothing; the last
    block's output at the last token gives back the clean prediction, elsewhere it cannot reach it."""
    model, tok, results, summary = traced
    L = detect_adapter(model).n_layers
    for req, r in zip(requests, results):
        T = len(tok(req.text)["input_ids"])
        s0, s1 = r.subject_range
        assert r.hidden.shape == (L, T) and r.mlp.shape == (L,) and len(r.tokens) == T
        assert 0 <= s0 < s1 <= T and 0 < r.p_clean <= 1 and 0 < r.p_corrupt <= 1
        assert np.allclose(r.hidden[:, :s0], r.p_corrupt, rtol=1e-4, atol=1e-6)
        assert r.hidden[-1, -1] == pytest.approx(r.p_clean, **TOL)
        assert np.allclose(r.hidden[-1, :-1], r.p_corrupt, rtol=1e-4, atol=1e-6)
        assert r.p_corrupt != pytest.approx(r.p_clean, abs=1e-6)  # the noise does corrupt
    assert [r.target for r in results[:3]] == ["tennis", "Paris", "blue"]
    assert np.asarray(summary.hidden_effect).shape == (L, len(BUCKETS)) and len(summary.mlp_effect) == L
    assert summary.n == len(requests) and summary.window == 3


def test_request_without_true_object_traces_the_models_own_answer(traced) -> None:
    model, tok, results, _ = traced
    r = results[3]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([tok("I sigma is")["input_ids"]])).logits[0, -1], -1)
    assert r.p_clean == pytest.approx(probs.max().item(), **TOL)
    assert tok.decode([int(probs.argmax())]).strip() == r.target


@pytest.mark.parametrize("family", FAMILIES)
def test_no_noise_every_restore_equals_clean(family, requests) -> None:
    """The corrupted-nothing limit: with zero noise every restored probability is the clean one."""
    model, tok = tiny_model(family)
    results, summary = trace_requests(model, tok, requests[:2], noise=0.0, samples=2, window=1)
    for r in results:
        assert r.p_corrupt == pytest.approx(r.p_clean, **TOL)
        assert np.allclose(r.hidden, r.p_clean, rtol=1e-4, atol=1e-6)
        assert np.allclose(r.mlp, r.p_clean, rtol=1e-4, atol=1e-6)
    assert np.allclose(summary.mlp_effect, 0, atol=1e-5) and np.allclose(summary.hidden_effect, 0, atol=1e-5)


def test_mlp_window_restores_the_rewrite_output_of_a_single_layer_like_a_manual_patch(requests) -> None:
    """Window 1 at layer l equals restoring the Adapter's rewrite output of l alone, done by hand."""
    from editflow import nethook
    from editflow.trace import _add_noise, embedding_std

    model, tok = tiny_model("gpt2")
    ad = detect_adapter(model)
    req = requests[0]
    (r,), _ = trace_requests(model, tok, [req], noise=3.0, samples=2, window=1, seed=7)
    ids = torch.tensor([tok(req.text)["input_ids"]])
    s0, s1 = r.subject_range
    noise = torch.randn(2, s1 - s0, 64, generator=torch.Generator().manual_seed(7)) * 3.0 * embedding_std(model)
    target = tok(" tennis")["input_ids"][0]
    with torch.no_grad(), nethook.capture(model, outputs_of=[ad.rewrite(1)]) as clean:
        model(input_ids=ids)

    def restore(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, s1 - 1] = clean[ad.rewrite(1)][0, s1 - 1]
        return h

    with (
        torch.no_grad(),
        nethook.patch_output(model, ad.embed, _add_noise((s0, s1), noise)),
        nethook.patch_output(model, ad.rewrite(1), restore),
    ):
        p = torch.softmax(model(input_ids=ids.expand(2, -1)).logits[:, -1], -1)[:, target].mean().item()
    assert r.mlp[1] == pytest.approx(p, **TOL)


def test_raw_records_of_any_format_trace_like_their_requests(requests) -> None:
    model, tok = tiny_model("qwen2")
    from_records, _ = trace_records(model, tok, RECORDS, samples=2)
    from_requests, _ = trace_requests(model, tok, requests, samples=2)
    for a, b in zip(from_records, from_requests, strict=True):
        assert (a.prompt, a.subject, a.target, a.subject_range) == (b.prompt, b.subject, b.target, b.subject_range)
        assert np.array_equal(a.hidden, b.hidden) and np.array_equal(a.mlp, b.mlp)


def test_mlp_only_trace_equals_the_full_traces_mlp_effects(traced, requests) -> None:
    """What tune reads (the MLP effects and the window they give) without the hidden-state restores."""
    model, tok, results, summary = traced
    fast, fast_summary = trace_requests(model, tok, requests, samples=3, window=3, hidden_states=False)
    for full, quick in zip(results, fast):
        # equal up to float summation order (the forwards batch differently with the thread count)
        assert quick.hidden is None and quick.p_corrupt == pytest.approx(full.p_corrupt, **TOL)
        np.testing.assert_allclose(quick.mlp, full.mlp, rtol=TOL["rel"], atol=TOL["abs"])
    np.testing.assert_allclose(fast_summary.mlp_effect, summary.mlp_effect, rtol=TOL["rel"], atol=TOL["abs"])
    assert fast_summary.hidden_effect == []
    assert best_window(fast_summary, 2) == best_window(summary, 2)


def test_window_users() -> None:
    assert window_users(3, 1) == [[0], [1], [2]]
    assert window_users(4, 3) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    assert window_users(4, 2) == [[0, 1], [1, 2], [2, 3], [3]]  # window of l: l-1, l


def _summary(mlp: list[float]) -> TraceSummary:
    return TraceSummary(
        n=1,
        noise_std=1.0,
        samples=1,
        window=1,
        p_clean=1.0,
        p_corrupt=0.0,
        buckets=list(BUCKETS),
        hidden_effect=[[0.0] * 6 for _ in mlp],
        mlp_effect=mlp,
    )


def test_best_window_picks_the_highest_mean_consecutive_layers() -> None:
    s = _summary([0.1, 0.5, 0.4, 0.0, 0.9])
    assert best_window(s, 1) == (4,)
    assert best_window(s, 2) == (1, 2)  # 0.45 ties with (3, 4): the shallower window wins
    assert best_window(s, 3) == (2, 3, 4)  # 0.433 > 0.3
    assert best_window(s, 9) == (0, 1, 2, 3, 4)
    assert s.best_mlp_layers(2) == [1, 2]
    with pytest.raises(ValueError, match="width"):
        best_window(s, 0)


def test_best_window_of_one_result_uses_its_indirect_effects(traced) -> None:
    _, _, results, _ = traced
    r = results[0]
    w = best_window(r, 2)
    eff = r.mlp - r.p_corrupt
    assert len(w) == 2 and eff[list(w)].mean() == pytest.approx(max(eff[i : i + 2].mean() for i in range(len(eff) - 1)))
    assert summarise([r], 1.0, 3, 3).mlp_effect == pytest.approx(list(eff))


def test_cli_on_a_model_directory(tmp_path: Path) -> None:
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    res = CliRunner().invoke(
        command,
        [
            str(tmp_path / "m"),
            "--records",
            str(tmp_path / "r.jsonl"),
            "--samples",
            "2",
            "--width",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert data["n"] == 4 and len(data["mlp_effect"]) == 4 and (tmp_path / "out" / "trace.png").stat().st_size > 0
    assert f"best 2 consecutive MLP layers: {list(best_window(_summary(data['mlp_effect']), 2))}" in res.output


def test_cli_bad_records_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('[{"prompt": "no slot", "subject": "x", "target_new": "y"}]')
    res = CliRunner().invoke(command, ["default", "--records", str(tmp_path / "bad.json")])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0
    assert res.output.startswith("error: record 0, field 'prompt'")


def test_cli_traces_registered_versions_by_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """models:/NAME/V and models:/NAME@alias load through the registry and trace the same weights."""
    from editflow.registry import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model, tok = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    reg = Registry()
    base = resolve.ensure_registered_base(
        reg, resolve.resolve_base(reg, str(tmp_path / "m"), device="cpu"), "tiny-trace"
    )
    assert base.uri == "models:/tiny-trace/1"
    (tmp_path / "r.json").write_text(json.dumps(RECORDS[:2]))
    outs = []
    for ref in ("models:/tiny-trace/1", "models:/tiny-trace@production", str(tmp_path / "m")):
        res = CliRunner().invoke(command, [ref, "--records", "r.json", "--samples", "2", "--out", "o"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads(Path("o/trace.json").read_text()))
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.slow
def test_trace_cli_on_shipped_model(tmp_path: Path) -> None:
    """Measured on the shipped model (first 10 records, 5 samples; same figures before and after trace.py
    moved onto nethook/Adapter): P(true) 0.626 clean, 0.078 corrupted; the layer-0 MLP at the subject's last
    token carries the fact (effect 0.2515, then 0.036, 0.009), the subject's last token at layer 0 recovers
    0.267, and the last token recovers more with depth (0.094 -> 0.548 = clean − corrupted at the top)."""
    from editflow.demo import default_model_path, default_records_path

    res = CliRunner().invoke(
        command,
        [
            str(default_model_path()),
            "--records",
            str(default_records_path()),
            "--n",
            "10",
            "--samples",
            "5",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "trace.json").read_text())
    hid, mlp = np.asarray(data["hidden_effect"]), np.asarray(data["mlp_effect"])
    first, last_subj, last_tok = (BUCKETS.index(b) for b in ("first subject token", "last subject token", "last token"))
    assert data["p_clean"] == pytest.approx(0.626, abs=1e-3) and data["p_corrupt"] == pytest.approx(0.078, abs=1e-3)
    assert mlp[:3] == pytest.approx([0.2515, 0.0358, 0.0086], abs=1e-4)
    assert data["best_mlp_layers_3"] == [0, 1, 2] and int(np.argmax(mlp)) == 0
    assert hid[0, last_subj] > 0.25 and hid[0, last_subj] > 3 * hid[0, first]
    assert hid[-1, last_tok] == pytest.approx(data["p_clean"] - data["p_corrupt"], abs=1e-4)
    assert hid[-1, last_tok] > hid[3, last_tok] > hid[0, last_tok]


def test_save_summary_writes_json_and_plot(tmp_path: Path) -> None:
    out = save_summary(_summary([0.1, 0.3, 0.2]), tmp_path)
    data = json.loads((out / "trace.json").read_text())
    assert data["best_mlp_layers_3"] == [0, 1, 2] and data["mlp_effect"] == [0.1, 0.3, 0.2]
    assert (out / "trace.png").stat().st_size > 0
