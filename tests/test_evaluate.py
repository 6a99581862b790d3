"""Evaluation: scoring core, metrics, fluency, drift, reports and ``editflow eval`` on a real tiny GPT-2.

Expected values are computed independently here: one unpadded forward per prompt, NLLs by hand.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from editflow.evaluate import (Evaluator, drift, drift_reference, fact_table, greedy_answers,  # noqa: E402
                               harmonic_mean, ngram_entropy, score_targets, summary, text_entropy,
                               weighted_ngram_entropy, words, write_report)
from editflow.requests import parse_requests  # noqa: E402

WORDS = ("<eos> the capital of France Germany Italy Spain is Paris Rome Berlin Madrid city plays sport "
         "football basketball tennis LeBron James Serena Williams what a b c").split()


@pytest.fixture(scope="module")
def lm():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     initializer_range=0.4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), tok


def direct(model, tok, prefix: str, target: str) -> tuple[float, bool, float]:
    """(mean NLL, all-argmax, token accuracy) of " "+target after prefix: one unpadded forward."""
    p = tok(prefix)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)
    nll = [-logp[len(p) - 1 + k, tok_id].item() for k, tok_id in enumerate(t)]
    hits = [int(logp[len(p) - 1 + k].argmax()) == tok_id for k, tok_id in enumerate(t)]
    return sum(nll) / len(t), all(hits), sum(hits) / len(t)


def greedy(model, tok, prefix: str, n: int) -> list[int]:
    ids = tok(prefix)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return out


PAIRS = [("the capital of France is", "Paris"), ("LeBron James plays the sport", "basketball tennis"),
         ("what", "Rome Berlin Madrid city"), ("the capital of Germany is", "Berlin")]


# --------------------------------------------------------------------------- scoring core


@pytest.mark.parametrize("kwargs", [{}, {"padding_side": "left"}, {"one_by_one": True}, {"batch_rows": 3}])
def test_scores_match_direct_forward(lm, kwargs):
    model, tok = lm
    s = score_targets(model, tok, PAIRS, **kwargs)
    for k, (p, t) in enumerate(PAIRS):
        nll, top1, acc = direct(model, tok, p, t)
        assert s.nll[k] == pytest.approx(nll, abs=1e-5)
        assert bool(s.top1[k]) == top1 and s.token_acc[k] == pytest.approx(acc)
    assert list(s.n_tokens) == [1, 2, 4, 1]


def test_padding_invariance(lm):
    model, tok = lm
    right, left = (score_targets(model, tok, PAIRS, padding_side=side) for side in ("right", "left"))
    np.testing.assert_allclose(right.nll, left.nll, atol=1e-5)
    assert (right.top1 == left.top1).all() and (right.token_acc == left.token_acc).all()


def test_top1_and_token_accuracy_on_greedy_answer(lm):
    model, tok = lm
    ids = greedy(model, tok, "the capital of", 3)
    target = tok.decode(ids).strip()
    assert tok(" " + target, add_special_tokens=False)["input_ids"] == ids
    s = score_targets(model, tok, [("the capital of", target)])
    assert s.top1[0] and s.token_acc[0] == 1.0
    prefixes = [tok("the capital of")["input_ids"], tok("what")["input_ids"]]
    assert greedy_answers(model, prefixes, [3, 2], 0) == [tuple(ids), tuple(greedy(model, tok, "what", 2))]


# --------------------------------------------------------------------------- metrics


CF = [{"case_id": 1, "requested_rewrite": {"prompt": "the capital of {} is", "subject": "France",
                                           "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
       "paraphrase_prompts": ["France capital is", "what is the capital of France"],
       "neighborhood_prompts": ["the capital of Germany is", "the capital of Spain is"],
       "generation_prompts": ["France is"]},
      {"case_id": 2, "requested_rewrite": {"prompt": "{} plays the sport", "subject": "LeBron James",
                                           "target_new": {"str": "tennis football"}, "target_true": {"str": "basketball"}},
       "paraphrase_prompts": ["LeBron James plays"], "neighborhood_prompts": ["Serena Williams plays the sport"],
       "generation_prompts": ["LeBron James is"]}]


def test_counterfact_metrics_hand_checked(lm):
    model, tok = lm
    reqs = parse_requests(CF)
    res = Evaluator((model, tok), reqs, fluency=False).pre()
    es, em, e1, ps, ns = [], [], [], [], []
    for r in reqs:
        (nn_, t_new, _), (nt, t_true, _) = direct(model, tok, r.text, r.target_new), direct(model, tok, r.text, r.target_true)
        es.append(nn_ < nt); em.append(math.exp(-nn_) - math.exp(-nt)); e1.append(t_new)
        ps.append(np.mean([direct(model, tok, p, r.target_new)[0] < direct(model, tok, p, r.target_true)[0]
                           for p in r.paraphrase_prompts]))
        ns.append(np.mean([direct(model, tok, p, r.target_true)[0] < direct(model, tok, p, r.target_new)[0]
                           for p in r.neighborhood_prompts]))
    m = res.metrics
    assert m["efficacy"] == pytest.approx(100 * np.mean(es))
    assert m["efficacy_magnitude"] == pytest.approx(100 * np.mean(em), abs=1e-4)
    assert m["efficacy_top1"] == pytest.approx(100 * np.mean(e1))
    assert m["paraphrase"] == pytest.approx(100 * np.mean(ps))
    assert m["neighborhood"] == pytest.approx(100 * np.mean(ns))
    assert m["score"] == pytest.approx(harmonic_mean([m["efficacy"], m["paraphrase"], m["neighborhood"]]))
    assert res.facts.loc[1, "p_new"] == pytest.approx(math.exp(-direct(model, tok, reqs[1].text, "tennis football")[0]),
                                                      rel=1e-5)


def test_harmonic_mean():
    assert harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)
    assert harmonic_mean([0.0, 100.0, 100.0]) == 0.0


def test_plain_request_gets_efficacy_and_specificity(lm):
    model, tok = lm
    reqs = parse_requests([{"prompt": "the capital of {} is", "subject": "France", "target_new": "Rome Berlin"},
                           {"prompt": "{} plays the sport", "subject": "Serena Williams", "target_new": "football"}])
    heldout = parse_requests([{"prompt": "the capital of {} is", "subject": "Italy", "target_new": "Paris",
                               "target_true": "Rome"}])
    res = Evaluator((model, tok), reqs, heldout_facts=heldout, heldout_known_only=False, fluency=False).pre()
    # Efficacy against the pre-edit greedy answer (as many tokens as the new target).
    expected = []
    for r, n in zip(reqs, (2, 1)):
        ans = tok.decode(greedy(model, tok, r.text, n))
        expected.append(direct(model, tok, r.text, r.target_new)[0] < direct(model, tok, r.text, ans)[0])
    assert res.metrics["efficacy"] == pytest.approx(100 * np.mean(expected))
    # Automatic neighbours: own prompt with the other request's subject; pre-edit answer is top-1 by construction.
    auto = res.checks[res.checks["kind"] == "neighborhood_auto"]
    assert sorted(auto["text"]) == ["France plays the sport", "the capital of Serena Williams is"]
    assert res.metrics["neighborhood_auto_top1"] == 100.0 and "neighborhood_auto" in res.metrics
    assert res.metrics["heldout"] == 100.0 and res.metrics["n_heldout"] == 1
    # known_only drops held-out facts whose pre-edit answer is not target_true.
    known = greedy(model, tok, "the capital of Italy is", 1) == tok(" Rome", add_special_tokens=False)["input_ids"]
    res2 = Evaluator((model, tok), reqs, heldout_facts=heldout, fluency=False).pre()
    assert res2.metrics["n_heldout"] == float(known)


def test_zsre_token_accuracy(lm):
    model, tok = lm
    src = "what is the capital of France"
    loc_ans = tok.decode(greedy(model, tok, "what a b", 2))  # token accuracy 1 by construction
    alt = tok.decode(greedy(model, tok, src, 1)) + " c"  # first token right: accuracy >= 1/2
    reqs = parse_requests([{"subject": "France", "src": src, "alt": alt, "answers": ["Paris"],
                            "rephrase": "the capital of France is", "loc": "what a b", "loc_ans": loc_ans}])
    m = Evaluator((model, tok), reqs, fluency=False).pre().metrics
    assert m["zsre_efficacy"] == pytest.approx(100 * direct(model, tok, src, alt)[2]) and m["zsre_efficacy"] >= 50
    assert m["zsre_paraphrase"] == pytest.approx(100 * direct(model, tok, "the capital of France is", alt)[2])
    assert m["zsre_specificity"] == 100.0
    assert "efficacy" not in m


# --------------------------------------------------------------------------- fluency


def test_ngram_entropy_by_hand():
    toks = ["a", "b", "a", "b", "a"]
    h2 = 1.0  # bigrams ab, ba, ab, ba
    h3 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)  # aba, bab, aba
    assert ngram_entropy(toks, 2) == pytest.approx(h2) and ngram_entropy(toks, 3) == pytest.approx(h3)
    assert weighted_ngram_entropy(toks) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert words("a b, a b a") == ["a", "b", ",", "a", "b", "a"]
    assert text_entropy(["a b a b a", "a a a"]) == pytest.approx(((2 / 3 * h2 + 4 / 3 * h3) / 2 + 0.0) / 2)


def test_fluency_is_seeded(lm):
    model, tok = lm
    reqs = parse_requests(CF)
    a = Evaluator((model, tok), reqs, fluency_tokens=12).pre()
    b = Evaluator((model, tok), reqs, fluency_tokens=12).pre()
    assert a.metrics["fluency"] == b.metrics["fluency"] and 0 < a.metrics["fluency"] < 800


# --------------------------------------------------------------------------- drift


TEXTS = ["the capital of France is Paris", "LeBron James plays the sport basketball", "what a b c a b"]


def test_drift_zero_then_positive(lm):
    model, tok = lm
    ref = drift_reference(model, tok, TEXTS, top_k=4)
    assert ref.n_tokens == 5 + 5 + 5
    d = drift(model, tok, ref)
    assert d["kl"] == pytest.approx(0.0, abs=1e-9) and d["ppl_rel"] == pytest.approx(0.0, abs=1e-9)
    w = model.transformer.h[1].mlp.c_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(1)))
        d = drift(model, tok, ref)
        assert d["kl"] > 1e-4 and d["ppl_rel"] != 0.0
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_drift_kl_exact_with_full_vocabulary(lm):
    model, tok = lm
    other = GPT2LMHeadModel(model.config).eval()  # another random model = an "edited" one
    ref = drift_reference(model, tok, TEXTS, top_k=len(WORDS))
    kls = []
    for text in TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            p = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            q = torch.log_softmax(other(ids).logits[0, :-1].double(), -1)
        kls += (p.exp() * (p - q)).sum(-1).tolist()
    assert drift(other, tok, ref)["kl"] == pytest.approx(np.mean(kls), rel=1e-4)


# --------------------------------------------------------------------------- evaluator, report, CLI


def test_sequential_post_and_report(lm, tmp_path):
    model, tok = lm
    reqs = parse_requests(CF)
    ev = Evaluator((model, tok), reqs, heldout_texts=TEXTS, fluency=False)
    pre = ev.pre()
    w = model.transformer.h[0].mlp.c_proj.weight
    saved = w.detach().clone()
    try:
        first = ev.post(step=1, facts=[0])
        with torch.no_grad():
            w.mul_(3.0)
        second = ev.post(step=2)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert first.metrics["n_facts"] == 1 and second.metrics["n_facts"] == 2
    assert first.metrics["drift_kl"] == pytest.approx(0.0, abs=1e-9) and second.metrics["drift_kl"] > 0
    assert ev.pre() is pre and len(ev.history) == 2
    s = summary(pre, second)
    for key in ("pre/efficacy", "post/efficacy", "post/paraphrase", "post/neighborhood", "post/score",
                "pre/efficacy_magnitude", "post/efficacy_top1", "post/drift_ppl_rel", "post/drift_kl"):
        assert key in s
    table = fact_table(reqs, pre, second)
    assert list(table["subject"]) == ["France", "LeBron James"]
    assert {"pre_p_new", "post_p_new", "pre_efficacy", "post_neighborhood"} <= set(table.columns)
    paths = write_report(tmp_path, table, s, ev.history)
    assert {"summary", "facts_csv", "facts_json", "probabilities", "curve"} <= set(paths)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["summary"].read_text())["post/efficacy"] == s["post/efficacy"]


def test_cli_writes_outputs(lm, tmp_path):
    from editflow.cli import main

    model, tok = lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "reqs.json").write_text(json.dumps(CF))
    (tmp_path / "heldout.txt").write_text("\n".join(TEXTS))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "model"), str(tmp_path / "reqs.json"), "--out", str(out),
                                       "--device", "cpu", "--heldout", str(tmp_path / "heldout.txt"),
                                       "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "efficacy" in result.output and "fluency" in result.output
    for name in ("summary.json", "facts.csv", "facts.json", "probabilities.png"):
        assert (out / name).stat().st_size > 0
    s = json.loads((out / "summary.json").read_text())
    assert {"pre/efficacy", "pre/score", "pre/fluency", "pre/drift_ppl"} <= set(s)
